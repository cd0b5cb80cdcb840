// Shared by the chat page and the arena: element lookup, the request headers (with the API key the page holds),
// the status line, and server-sent events from a streamed fetch response.
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("camelid-api-key");
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

// Reads an SSE stream (OpenAI's `data: {...}` events, ending with `data: [DONE]`) and calls onEvent with each parsed `data:` object.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}
