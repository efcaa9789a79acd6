// The chat page: streams replies from /v1/chat/completions (SSE over fetch) and shows, per turn,
// the prompt tokens, cached_tokens (from the usage chunk) and the time to the first token.
// `?auto=Hello|Again` sends those turns one after another on load; `max_tokens` and `temperature`
// in the query string are passed on.
"use strict";

(() => {
  const { api, el, ms, num } = reprise;
  const query = new URLSearchParams(location.search);
  const turns = document.getElementById("turns");
  const status = document.getElementById("status");
  let messages = [];
  let busy = false;

  function body() {
    const request = { model: "default", messages, stream: true, stream_options: { include_usage: true },
      cache_report: true, max_tokens: Number(query.get("max_tokens") || 512) };
    if (query.has("temperature")) request.temperature = Number(query.get("temperature"));
    return JSON.stringify(request);
  }

  // Yields each SSE event's parsed JSON from a streaming response, until [DONE].
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function showMeta(turn, usage, cache, ttft) {
    const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    Object.assign(turn.dataset, { cachedTokens: cached, promptTokens: usage.prompt_tokens,
      ttftMs: (1000 * ttft).toFixed(1) });
    const meta = turn.querySelector(".meta");
    meta.replaceChildren();
    meta.append(`prompt ${num(usage.prompt_tokens)} tokens · `);
    el("b", { class: "cached-tokens" }, meta, `cached_tokens ${num(cached)}`);
    const share = usage.prompt_tokens ? ` (${(100 * cached / usage.prompt_tokens).toFixed(0)}%)` : "";
    meta.append(`${share} · TTFT ${ms(ttft)} · ${num(usage.completion_tokens)} tokens out`);
    if (cache && cache.miss_reason) meta.append(` · miss: ${cache.miss_reason} at ${cache.diverged_at}`);
  }

  function addTurn(role, text) {
    const turn = el("div", { class: "turn " + role }, turns);
    el("div", { class: "role" }, turn, role);
    el("div", { class: "content" }, turn, text);
    el("div", { class: "meta" }, turn);
    return turn;
  }

  async function send(text) {
    busy = true;
    messages.push({ role: "user", content: text });
    addTurn("user", text);
    const turn = addTurn("assistant", "");
    const content = turn.querySelector(".content");
    const started = performance.now();
    let ttft = null, reply = "", usage = null, cache = null;
    try {
      const response = await api("/v1/chat/completions", { method: "POST", body: body() });
      for await (const chunk of events(response)) {
        const delta = chunk.choices && chunk.choices.length ? chunk.choices[0].delta : null;
        if (delta && delta.content) {
          if (ttft === null) ttft = (performance.now() - started) / 1000;
          reply += delta.content;
          content.textContent = reply;
        }
        if (chunk.usage) usage = chunk.usage;
        if (chunk.cache) cache = chunk.cache;
      }
      if (ttft === null) ttft = (performance.now() - started) / 1000;     // a reply without text
      messages.push({ role: "assistant", content: reply });
      if (usage) showMeta(turn, usage, cache, ttft);
      status.textContent = "ready";
    } catch (error) {
      messages.pop();
      turn.querySelector(".meta").textContent = error.message;
      turn.classList.add("error");
    } finally {
      busy = false;
      document.body.dataset.turns = String(turns.querySelectorAll(".turn.assistant[data-cached-tokens]").length);
    }
  }

  document.getElementById("send").addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = event.target.elements.text;
    if (busy || !box.value.trim()) return;
    const text = box.value.trim();
    box.value = "";
    await send(text);
  });
  document.getElementById("send").elements.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      event.target.form.requestSubmit();
    }
  });
  document.getElementById("reset").addEventListener("click", () => { messages = []; turns.replaceChildren(); });

  (async () => {
    for (const text of (query.get("auto") || "").split("|").filter(Boolean)) await send(text);
  })();
})();
