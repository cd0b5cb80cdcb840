// The chat page: keeps the conversation in memory, streams replies from /v1/chat/completions
// (server-sent events read with fetch), renders them as Markdown as they grow.
"use strict";

const state = { messages: [], controller: null, models: [] };

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.dataset.role = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "you" : role;
  const body = document.createElement("div");
  body.className = "content";
  div.append(label, body);
  setBubbleText(div, text);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBubbleText(div, text) {
  const body = div.querySelector(".content");
  if (div.dataset.role === "assistant") body.innerHTML = renderMarkdown(text);
  else body.textContent = text;
}

function redraw() {
  $("messages").replaceChildren();
  for (const m of state.messages) addBubble(m.role, m.content);
}

function busy(on) {
  $("send").disabled = on;
  $("regenerate").disabled = on;
  $("reset").disabled = on;
  $("stop").hidden = !on;
}

async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) { setStatus("This server needs an API key: enter it in the settings."); return; }
    const body = await res.json();
    state.models = body.data;
    $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    showModel();
  } catch (e) {
    setStatus(`Cannot reach the server: ${e}`);
  }
}

function showModel() {
  const m = state.models.find((x) => x.id === $("model").value);
  if (!m) return;
  const info = m.camelid || {};
  $("template").textContent = info.template ? `template: ${info.template}` : "no chat template";
  $("model-info").textContent = info.context ? `context ${info.context} tokens, batch ${info.max_batch}` : "";
  $("max-tokens").max = info.context || 8192;
}

function requestMessages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.messages);
}

// The "max tokens" box is an upper bound: the server refuses a max_tokens that does not fit the context
// with the prompt, so it is lowered to what is left after the prompt (counted by the server's /tokenize).
async function maxTokens(model, messages) {
  const wanted = Number($("max-tokens").value) || undefined;
  if (!wanted) return undefined;
  const res = await fetch("/tokenize", {
    method: "POST", headers: headers(), body: JSON.stringify({ model, messages }),
  }).catch(() => null);
  if (!res || !res.ok) return wanted;
  const { count, max_model_len: limit } = await res.json();
  return Math.max(1, Math.min(wanted, limit - count));
}

async function reply() {
  busy(true);
  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  let text = "";
  const started = performance.now();
  let tokens = 0;
  state.controller = new AbortController();
  setStatus("generating…");
  try {
    const model = $("model").value, messages = requestMessages();
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model, messages, stream: true,
        temperature: Number($("temperature").value), top_p: Number($("top-p").value),
        max_tokens: await maxTokens(model, messages),
      }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    }
    let finish = null;
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        tokens += 1;
        setBubbleText(bubble, text);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${finish === "length" ? "stopped at max tokens" : "done"} · ${seconds.toFixed(1)} s`);
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped");
    } else {
      bubble.classList.add("error");
      setStatus(`error: ${e.message}`);
      if (!text) text = `⚠ ${e.message}`;
      setBubbleText(bubble, text);
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    state.messages.push({ role: "assistant", content: text });
    state.controller = null;
    busy(false);
  }
}

function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  reply();
}

function regenerate() {
  if (state.controller) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") state.messages.pop();
  if (!state.messages.length) return;
  redraw();
  reply();
}

function reset() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  redraw();
  setStatus("");
}

function bindRange(id) {
  const show = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("regenerate").addEventListener("click", regenerate);
$("reset").addEventListener("click", reset);
$("model").addEventListener("change", showModel);
$("toggle-settings").addEventListener("click", () => $("settings").classList.toggle("open"));
$("api-key").addEventListener("change", () => {
  localStorage.setItem("camelid-api-key", $("api-key").value.trim());
  loadModels();
});
bindRange("temperature");
bindRange("top-p");
busy(false);
loadModels();
