// The arena page: one prompt to two anonymous models (both streamed), a vote, then their names.
const state = { battle: null, conv: { a: [], b: [] }, busy: false, voted: false };

function canVote(on) {
  document.querySelectorAll("#votes button[data-winner]").forEach((b) => { b.disabled = !on; });
}

function render(side) {
  const box = $(`conv-${side}`);
  box.textContent = "";
  for (const m of state.conv[side]) {
    const div = document.createElement("div");
    div.className = `turn-${m.role}`;
    div.textContent = m.content;
    box.appendChild(div);
  }
}

async function newBattle() {
  const res = await fetch("/arena/battles", { method: "POST", headers: headers() });
  if (res.status === 401) throw new Error("this server needs an API key: enter it above");
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  state.battle = (await res.json()).battle_id;
}

async function stream(side) {
  const conv = state.conv[side];
  const res = await fetch(`/arena/battles/${state.battle}/${side}`, {
    method: "POST", headers: headers(),
    body: JSON.stringify({ messages: conv, max_tokens: Number($("max-tokens").value) || undefined }),
  });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  }
  const reply = { role: "assistant", content: "" };
  conv.push(reply);
  await readEvents(res, (chunk) => {
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      reply.content += choice.delta.content;
      render(side);
    }
  });
  render(side);
}

async function send(e) {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy || state.voted) return;
  state.busy = true;
  canVote(false);
  $("send").disabled = true;
  try {
    if (!state.battle) await newBattle();
    for (const side of ["a", "b"]) { state.conv[side].push({ role: "user", content: text }); render(side); }
    $("prompt").value = "";
    setStatus("both models are answering…");
    await Promise.all([stream("a"), stream("b")]);
    setStatus("vote when you are ready (or ask a follow-up)");
    canVote(true);
  } catch (err) {
    setStatus(`error: ${err.message}`);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function vote(winner) {
  canVote(false);
  try {
    const res = await fetch(`/arena/battles/${state.battle}/vote`, {
      method: "POST", headers: headers(),
      body: JSON.stringify({ winner, conversation_a: state.conv.a, conversation_b: state.conv.b }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    state.voted = true;
    for (const [side, name] of [["a", body.model_a], ["b", body.model_b]]) {
      const h = $(`name-${side}`);
      h.textContent = `Model ${side.toUpperCase()}: ${name}`;
      h.classList.add("reveal");
    }
    setStatus(`vote ${body.vote_id} recorded: start a new round`);
  } catch (err) {
    setStatus(`error: ${err.message}`);
    canVote(true);
  }
}

function newRound() {
  state.battle = null;
  state.voted = false;
  state.conv = { a: [], b: [] };
  for (const side of ["a", "b"]) {
    render(side);
    $(`name-${side}`).textContent = `Model ${side.toUpperCase()}`;
    $(`name-${side}`).classList.remove("reveal");
  }
  canVote(false);
  setStatus("");
}

$("ask").addEventListener("submit", send);
$("new-round").addEventListener("click", newRound);
document.querySelectorAll("#votes button[data-winner]").forEach((b) => {
  b.addEventListener("click", () => vote(b.dataset.winner));
});
$("api-key").value = localStorage.getItem("camelid-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("camelid-api-key", $("api-key").value.trim()));
