"use strict";
// The chat page. It talks only to this server's own OpenAI API (same origin): the models
// from GET /v1/models, each reply streamed from POST /v1/chat/completions. The conversation
// lives in this page; the API key, when the server wants one, in this browser's storage.
// Model output is only ever set as text (textContent), never parsed as HTML: a model that
// writes "<script>" shows it, and the Content-Security-Policy would not run it anyway.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "splitinfer.apiKey";

// The turns sent with each request: {role, content, element}; errors are shown, not sent.
const conversation = [];
let controller = null; // the reply being streamed, if any

function setStatus(text) {
  $("status").textContent = text;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

class APIError extends Error {}

// "401: message (code)" from an OpenAI error body, else the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return describe(body.error, response.status);
  } catch (_) {
    // not JSON: the status line says enough
  }
  return `${response.status} ${response.statusText}`;
}

function describe(error, status) {
  const prefix = status ? `${status}: ` : "";
  const code = error.code ? ` (${error.code})` : "";
  return `${prefix}${error.message || "error"}${code}`;
}

function openSettings(open = true) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

async function loadModels() {
  setStatus("Loading the models…");
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (error) {
    setStatus("Cannot reach the server: " + error.message);
    return;
  }
  if (response.status === 401) {
    openSettings();
    $("api-key").focus();
    setStatus("This server requires an API key: enter it under Settings.");
    return;
  }
  if (!response.ok) {
    setStatus("Models: " + (await errorText(response)));
    return;
  }
  const models = (await response.json()).data || [];
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(
    ...models.map((model) => {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.id;
      return option;
    }),
  );
  if (models.some((model) => model.id === previous)) select.value = previous;
  setStatus(models.length ? "" : "No model is being served yet.");
}

// Text with ``` fences: plain runs as text, fenced runs as <pre><code> (the language tag
// after the opening fence is dropped). An unclosed fence, mid-stream, is a code block too.
function render(element, text) {
  const parts = text.split("```");
  element.replaceChildren(
    ...parts.flatMap((part, i) => {
      if (i % 2 === 0) {
        return part ? [document.createTextNode(part)] : [];
      }
      const newline = part.indexOf("\n");
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = newline >= 0 ? part.slice(newline + 1) : part;
      pre.append(code);
      return [pre];
    }),
  );
}

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  render(content, text);
  const meta = document.createElement("div");
  meta.className = "meta";
  element.append(label, content, meta);
  $("conversation").append(element);
  element.scrollIntoView({ block: "end" });
  return { element, content, meta };
}

function showError(text) {
  addMessage("error", text);
}

// The server-sent events of a streamed reply, parsed: yields each `data:` payload's JSON
// until `data: [DONE]` (lines may end in \r\n).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function number(id, parse) {
  const value = parse($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

function statsLine(started, first, ended, usage) {
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  if (usage) {
    const generated = usage.completion_tokens;
    if (first !== null && generated > 1 && ended > first) {
      parts.push(`${((generated - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
    }
    parts.push(`${usage.prompt_tokens} prompt + ${generated} completion tokens`);
  }
  return parts.join(" · ");
}

async function send(text) {
  if (!$("model").value) await loadModels();
  const model = $("model").value;
  if (!model) {
    showError("There is no model to talk to (see the status line below).");
    return;
  }
  const user = addMessage("user", text);
  conversation.push({ role: "user", content: text, element: user.element });
  const reply = addMessage("assistant", "");
  reply.element.classList.add("streaming");
  reply.element.dataset.state = "streaming";
  const system = $("system").value.trim();
  const messages = conversation.map(({ role, content }) => ({ role, content }));
  const body = {
    model,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature", parseFloat),
    top_p: number("top-p", parseFloat),
    max_tokens: number("max-tokens", (v) => parseInt(v, 10)),
  };
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  let answer = "";
  let state = "done";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new APIError(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new APIError(describe(event.error));
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (first === null) first = performance.now();
          answer += delta;
          render(reply.content, answer);
          reply.element.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      state = "stopped";
    } else {
      state = "error";
      showError(error instanceof APIError ? error.message : "The request failed: " + error.message);
    }
  } finally {
    controller = null;
  }
  const ended = performance.now();
  reply.element.classList.remove("streaming");
  reply.element.dataset.state = state;
  if (answer) {
    conversation.push({ role: "assistant", content: answer, element: reply.element });
    const note = state === "stopped" ? "stopped" : finish === "length" ? "cut at max tokens" : "";
    reply.meta.textContent = [statsLine(started, first, ended, usage), note].filter(Boolean).join(" · ");
  } else {
    reply.element.remove(); // nothing came: the error (or the stop) says why
    if (state === "stopped") setStatus("Stopped before the first token.");
  }
  setBusy(false);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("edit").disabled = busy || !conversation.some((turn) => turn.role === "user");
}

// The last user message back in the box, and everything from it on removed.
function editLast() {
  let index = conversation.length - 1;
  while (index >= 0 && conversation[index].role !== "user") index--;
  if (index < 0) return;
  const turn = conversation[index];
  let node = turn.element;
  while (node) {
    const next = node.nextElementSibling;
    node.remove();
    node = next;
  }
  conversation.splice(index);
  $("input").value = turn.content;
  $("input").focus();
  setBusy(false);
}

function clearAll() {
  if (controller) controller.abort();
  conversation.splice(0);
  $("conversation").replaceChildren();
  setStatus("");
  setBusy(false);
}

function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  $("settings-toggle").addEventListener("click", () => openSettings($("settings").hidden));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("edit").addEventListener("click", editLast);
  $("clear").addEventListener("click", clearAll);
  setBusy(false);
  loadModels();
}

start();
