// tinyllama2's chat page: streams answers from /v1/chat/completions (OpenAI's SSE chunks, parsed here).
// Every piece of user or model text goes into the page as text (textContent / text nodes), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"), sidebar: $("sidebar"), toggle: $("toggle-settings"), backdrop: $("backdrop"),
    status: $("status"), statusText: $("status-text"), title: $("title"),
    messages: $("messages"), scroller: $("scroller"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"), regenerate: $("regenerate"), clear: $("clear"),
    system: $("system"), temperature: $("temperature"), temperatureRange: $("temperature-range"),
    topP: $("top-p"), topPRange: $("top-p-range"), maxTokens: $("max-tokens"), maxTokensHint: $("max-tokens-hint"),
    apiKey: $("api-key"),
  };

  // ---- settings kept in this browser --------------------------------------------------------------------------
  const PREFIX = "tinyllama2.";
  const store = {
    get(name) { try { return localStorage.getItem(PREFIX + name); } catch { return null; } },
    set(name, value) { try { localStorage.setItem(PREFIX + name, value); } catch { /* private mode: not kept */ } },
  };
  const KEPT = { "api-key": el.apiKey, system: el.system, temperature: el.temperature, "top-p": el.topP,
                 "max-tokens": el.maxTokens };
  for (const [name, input] of Object.entries(KEPT)) {
    const saved = store.get(name);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => store.set(name, input.value));
  }

  // ---- state ------------------------------------------------------------------------------------------------------
  let model = null;          // the model's id, from /v1/models
  let maxModelLen = null;    // its context length
  let turns = [];            // {role: "user" | "assistant", content, node, state}
  let running = null;        // the answer being streamed: {turn, controller}

  const authHeaders = () => {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  };

  // ---- numbers: clamped to what the server accepts -------------------------------------------------------------
  function clampNumber(input, lo, hi, fallback, integer = false) {
    let v = Number.parseFloat(input.value);
    if (!Number.isFinite(v)) v = fallback;
    if (integer) v = Math.round(v);
    v = Math.min(hi, Math.max(lo, v));
    if (String(v) !== input.value) input.value = String(v);
    return v;
  }
  const temperature = () => clampNumber(el.temperature, 0, 2, 0.8);
  const topP = () => clampNumber(el.topP, 0, 1, 0.95);
  const maxTokens = () => clampNumber(el.maxTokens, 1, maxModelLen || 1 << 20, maxModelLen || 512, true);

  function pair(number, range, read) {
    range.value = number.value;
    range.addEventListener("input", () => { number.value = range.value; });
    range.addEventListener("change", () => { number.dispatchEvent(new Event("change")); });
    number.addEventListener("input", () => { range.value = number.value; });
    number.addEventListener("change", () => { read(); range.value = number.value; store.set(number.id, number.value); });
  }
  pair(el.temperature, el.temperatureRange, temperature);
  pair(el.topP, el.topPRange, topP);
  el.maxTokens.addEventListener("change", () => { maxTokens(); store.set("max-tokens", el.maxTokens.value); });

  // ---- the model ------------------------------------------------------------------------------------------------
  function setStatus(state, text) {
    el.status.dataset.state = state;
    el.statusText.textContent = text;
  }

  let modelTimer = null;
  async function loadModel() {
    clearTimeout(modelTimer);
    try {
      const res = await fetch("/v1/models", { headers: authHeaders() });
      if (!res.ok) {
        setStatus("error", await errorMessage(res));
        if (res.status >= 500) modelTimer = setTimeout(loadModel, 2000);
        return;
      }
      const card = (await res.json()).data?.[0];
      if (!card) { setStatus("error", "the server lists no model"); return; }
      model = card.id;
      el.title.textContent = model;
      document.title = `${model} · tinyllama2 chat`;
      if (card.max_model_len == null) {   // still loading
        setStatus("loading", `${model}: loading…`);
        modelTimer = setTimeout(loadModel, 1500);
        return;
      }
      maxModelLen = card.max_model_len;
      el.maxTokens.max = String(maxModelLen);
      el.maxTokensHint.textContent = `Up to the model's context, ${maxModelLen} tokens (prompt included).`;
      maxTokens();
      setStatus("ready", `${model} · context ${maxModelLen}`);
    } catch (e) {
      setStatus("error", "cannot reach the server");
      modelTimer = setTimeout(loadModel, 3000);
    }
  }
  el.apiKey.addEventListener("change", loadModel);
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); el.apiKey.dispatchEvent(new Event("change")); });

  async function errorMessage(res) {
    let text = "";
    try { text = await res.text(); } catch { /* the body is gone */ }
    try {
      const body = JSON.parse(text);
      if (body?.error?.message) return body.error.message;
    } catch { /* not JSON */ }
    return `HTTP ${res.status}${res.statusText ? " " + res.statusText : ""}${text ? ": " + text.slice(0, 300) : ""}`;
  }

  // ---- rendering --------------------------------------------------------------------------------------------------
  function nearBottom() {
    const s = el.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }
  function scrollDown(force) {
    if (force || nearBottom()) el.scroller.scrollTop = el.scroller.scrollHeight;
  }

  function part(cls, text) {
    const div = document.createElement("div");
    div.className = cls;
    if (text) div.textContent = text;
    return div;
  }

  function addTurn(turn) {
    const stick = nearBottom();
    const node = part(`message ${turn.role}`);
    node.append(part("role", turn.role === "user" ? "You" : (model || "assistant")));
    const content = part("content");
    const text = document.createTextNode(turn.content);   // text only: no markup is ever parsed
    content.append(text);
    node.append(content);
    if (turn.role === "assistant") {
      node.dataset.state = turn.state;
      node.append(part("stats"));
    }
    turn.node = node;
    turn.text = text;
    turns.push(turn);
    el.messages.append(node);
    scrollDown(stick);
    return turn;
  }

  function appendText(turn, piece) {
    const stick = nearBottom();
    turn.content += piece;
    turn.text.appendData(piece);
    scrollDown(stick);
  }

  function setState(turn, state) {
    turn.state = state;
    turn.node.dataset.state = state;
  }

  function showError(turn, message) {
    setState(turn, "error");
    const box = part("error", message);
    box.setAttribute("role", "alert");
    turn.node.querySelector(".stats").before(box);
    scrollDown(false);
  }

  function stats(turn, text, title) {
    const line = turn.node.querySelector(".stats");
    line.textContent = text;
    if (title) line.title = title;
  }

  const fmt = (x, digits) => x.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });

  function refreshButtons() {
    const busy = running !== null;
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    el.regenerate.disabled = busy || !turns.some((t) => t.role === "user");
  }

  // ---- talking to the server -----------------------------------------------------------------------------------
  function conversation() {
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const t of turns) {
      if (t.role === "user") messages.push({ role: "user", content: t.content });
      else if ((t.state === "done" || t.state === "stopped") && t.content) messages.push({ role: "assistant", content: t.content });
    }
    return messages;
  }

  // Yields the data of each server-sent event of a response body (the `data:` lines of an event, joined).
  async function* events(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const onAbort = () => reader.cancel().catch(() => {});
    signal.addEventListener("abort", onAbort, { once: true });
    let buffer = "", data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (signal.aborted) throw new DOMException("stopped", "AbortError");
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
          if (line === "") {
            if (data.length) yield data.join("\n");
            if (signal.aborted) throw new DOMException("stopped", "AbortError");
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          }   // comments (": ping") and other fields are ignored
        }
      }
      if (data.length) yield data.join("\n");
    } finally {
      signal.removeEventListener("abort", onAbort);
      try { reader.releaseLock(); } catch { /* a read is still pending: the stream is being cancelled */ }
    }
  }

  async function answer() {
    const messages = conversation();
    const turn = addTurn({ role: "assistant", content: "", state: "streaming" });
    const controller = new AbortController();
    running = { turn, controller };
    refreshButtons();
    const body = { messages, stream: true, stream_options: { include_usage: true },
                   temperature: temperature(), top_p: topP(), max_tokens: maxTokens() };
    if (model) body.model = model;
    const started = performance.now();
    let first = null, usage = null, finish = null, ended = null, sawDone = false;
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
      });
      if (!res.ok) {
        showError(turn, await errorMessage(res));
        if (res.status === 401) setStatus("error", "API key needed (see settings)");
        return;
      }
      for await (const data of events(res.body, controller.signal)) {
        if (controller.signal.aborted) throw new DOMException("stopped", "AbortError");
        if (data === "[DONE]") { sawDone = true; break; }
        let chunk;
        try { chunk = JSON.parse(data); } catch { continue; }
        if (chunk.error) { showError(turn, chunk.error.message || JSON.stringify(chunk.error)); return; }
        for (const choice of chunk.choices || []) {
          const piece = choice.delta?.content;
          if (piece) {
            if (first === null) first = performance.now();
            appendText(turn, piece);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (chunk.usage) { usage = chunk.usage; ended = performance.now(); }
      }
      if (!sawDone && !finish) { showError(turn, "the stream ended before the answer was complete"); return; }
      ended = ended ?? performance.now();
      setState(turn, "done");
      const seconds = Math.max((ended - started) / 1000, 1e-3);
      if (usage) {
        const rate = usage.completion_tokens / seconds;
        stats(turn, `${fmt(rate, 1)} tok/s · prompt ${usage.prompt_tokens} · completion ${usage.completion_tokens} tokens`
                    + ` · ${fmt(seconds, 2)} s${finish ? " · " + finish : ""}`,
              `${usage.completion_tokens} tokens in ${fmt(seconds, 3)} s from sending the request`
              + (first !== null ? `; first token after ${fmt((first - started) / 1000, 3)} s` : ""));
      } else {
        stats(turn, `${fmt(seconds, 2)} s${finish ? " · " + finish : ""}`);
      }
    } catch (e) {
      if (controller.signal.aborted) {
        setState(turn, "stopped");
        stats(turn, `stopped after ${fmt((performance.now() - started) / 1000, 2)} s`);
      } else {
        showError(turn, `cannot reach the server: ${e.message || e}`);
      }
    } finally {
      if (running?.turn === turn) running = null;
      refreshButtons();
    }
  }

  // ---- actions ------------------------------------------------------------------------------------------------------
  function send() {
    if (running) return;
    const text = el.input.value;
    if (!text.trim()) { el.input.focus(); return; }
    el.input.value = "";
    fitInput();
    addTurn({ role: "user", content: text });
    scrollDown(true);
    answer();
  }

  function stop() { running?.controller.abort(); }

  function regenerate() {
    if (running) return;
    const last = turns[turns.length - 1];
    if (last && last.role === "assistant") {
      last.node.remove();
      turns.pop();
    }
    if (!turns.some((t) => t.role === "user")) { refreshButtons(); return; }
    answer();
  }

  function clear() {
    stop();
    running = null;
    turns = [];
    el.messages.replaceChildren();
    refreshButtons();
    el.input.focus();
  }

  function fitInput() {
    el.input.style.height = "auto";
    el.input.style.height = `${Math.min(el.input.scrollHeight, 220)}px`;
  }

  el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && running) {
      stop();
    }
  });
  el.input.addEventListener("input", fitInput);
  el.stop.addEventListener("click", stop);
  el.regenerate.addEventListener("click", regenerate);
  el.clear.addEventListener("click", clear);

  function showSettings(open) {
    el.app.classList.toggle("settings-open", open);
    el.toggle.setAttribute("aria-expanded", String(open));
  }
  el.toggle.addEventListener("click", () => showSettings(!el.app.classList.contains("settings-open")));
  el.backdrop.addEventListener("click", () => showSettings(false));

  refreshButtons();
  loadModel();
  el.input.focus();
})();
