// personae chat page: pick a character, attach an image, chat with streamed replies.
// Plain browser JavaScript, no build step; talks to the same server's /v1 API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  characters: [],
  current: null,        // the selected character (from /v1/characters)
  messages: [],         // {role: "user"|"assistant", text, image (data URL or null)}
  image: null,          // data URL of the image waiting to be sent
  busy: false,
  abort: null,
  avatars: {},          // character id -> object URL
};

// ---- API -------------------------------------------------------------------------------------

function headers(extra) {
  const key = $("api-key").value.trim();
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let message = response.status + " " + response.statusText;
  try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
  if (response.status === 401) {
    document.querySelector(".settings").open = true;
    openSidebar(true);
    message += " (enter the API key under Settings)";
  }
  return new Error(message);
}

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text || "";
  el.classList.toggle("error", Boolean(isError));
}

// ---- characters ------------------------------------------------------------------------------

async function loadCharacters(selectId) {
  try {
    const body = await (await api("/v1/characters")).json();
    state.characters = body.data;
    renderCharacters();
    setStatus("sidebar-status", body.data.length ? "" : "no characters yet: upload a card");
    const wanted = selectId || (state.current && state.current.id) || localStorage.getItem("personae.character");
    const pick = body.data.find((c) => c.id === wanted) || body.data[0];
    if (pick) selectCharacter(pick.id);
  } catch (error) {
    setStatus("sidebar-status", error.message, true);
  }
}

async function avatarUrl(character) {
  if (!state.avatars[character.id]) {
    const blob = await (await api(character.avatar_url)).blob();
    state.avatars[character.id] = URL.createObjectURL(blob);
  }
  return state.avatars[character.id];
}

function renderCharacters() {
  const list = $("characters");
  list.replaceChildren();
  for (const character of state.characters) {
    const item = document.createElement("li");
    item.className = "character";
    item.dataset.id = character.id;
    item.tabIndex = 0;
    const img = document.createElement("img");
    img.className = "avatar";
    img.alt = "";
    avatarUrl(character).then((url) => { img.src = url; }).catch(() => {});
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = '<span class="name"></span><span class="tag"></span>';
    meta.querySelector(".name").textContent = character.name;
    meta.querySelector(".tag").textContent = character.source + (character.adapted ? " · adapted" : "");
    item.append(img, meta);
    if (character.source === "uploaded") item.append(deleteButton(character));
    item.addEventListener("click", () => { selectCharacter(character.id); openSidebar(false); });
    item.addEventListener("keydown", (e) => { if (e.key === "Enter") item.click(); });
    list.append(item);
  }
}

function deleteButton(character) {
  const button = document.createElement("button");
  button.className = "delete";
  button.title = "remove " + character.name;
  button.textContent = "\u00d7";
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    if (!confirm("Remove " + character.name + "?")) return;
    try {
      await api("/v1/characters/" + encodeURIComponent(character.id), { method: "DELETE" });
      if (state.current && state.current.id === character.id) state.current = null;
      await loadCharacters();
    } catch (error) { setStatus("sidebar-status", error.message, true); }
  });
  return button;
}

function selectCharacter(id) {
  const character = state.characters.find((c) => c.id === id);
  if (!character) return;
  const changed = !state.current || state.current.id !== id;
  state.current = character;
  localStorage.setItem("personae.character", id);
  for (const item of document.querySelectorAll(".character")) {
    item.classList.toggle("selected", item.dataset.id === id);
  }
  $("current-name").textContent = character.name;
  avatarUrl(character).then((url) => { $("current-avatar").src = url; $("current-avatar").hidden = false; });
  if (changed) startOver();
}

async function uploadCard(file) {
  setStatus("sidebar-status", "uploading " + file.name + " ...");
  const type = file.name.toLowerCase().endsWith(".png") ? "image/png" : "application/json";
  try {
    const character = await (await api("/v1/characters", {
      method: "POST", body: file, headers: { "Content-Type": type },
    })).json();
    const cut = (character.warnings || []).join("; ");  // a card too long for the model is cut, not refused
    setStatus("sidebar-status", "added " + character.name + (cut ? " (" + cut + ")" : ""));
    await loadCharacters(character.id);
  } catch (error) {
    setStatus("sidebar-status", error.message, true);
  }
}

// ---- images ----------------------------------------------------------------------------------

// Downscale in the browser so that phone photos stay far under the server's image limits.
function readImage(file, maxSide) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, maxSide / Math.max(img.naturalWidth, img.naturalHeight));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      URL.revokeObjectURL(url);
      resolve(canvas.toDataURL("image/png"));
    };
    img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("that file is not an image the browser can read")); };
    img.src = url;
  });
}

async function attachImage(file) {
  try {
    state.image = await readImage(file, 512);
    $("attachment-preview").src = state.image;
    $("attachment").hidden = false;
    setStatus("chat-status", "");
  } catch (error) {
    setStatus("chat-status", error.message, true);
  }
}

function clearAttachment() {
  state.image = null;
  $("attachment").hidden = true;
  $("image-input").value = "";
}

// ---- conversation ----------------------------------------------------------------------------

function startOver() {
  if (state.abort) state.abort.abort();
  state.messages = [];
  $("log").replaceChildren();
  const greeting = state.current && state.current.greeting;
  if (greeting) addMessage({ role: "assistant", text: greeting, image: null }, "done");
  setStatus("chat-status", "");
}

function addMessage(message, status) {
  state.messages.push(message);
  const item = document.createElement("li");
  item.className = "msg " + message.role;
  item.dataset.state = status || "done";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (message.image) {
    const img = document.createElement("img");
    img.src = message.image;
    img.alt = "attached image";
    bubble.append(img);
  }
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.text;
  bubble.append(text);
  if (message.role === "assistant" && state.current) {
    const avatar = document.createElement("img");
    avatar.className = "avatar small";
    avatar.alt = "";
    avatarUrl(state.current).then((url) => { avatar.src = url; });
    item.append(avatar);
  }
  item.append(bubble);
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

// The whole chat, with only the latest image: the model looks at one, so older ones would only
// make long illustrated chats heavy (the server counts history in tokens, not in messages).
function openAiMessages() {
  const latest = state.messages.map((m) => Boolean(m.image)).lastIndexOf(true);
  return state.messages.map((m, i) => {
    if (m.role === "user" && m.image && i === latest) {
      return { role: "user", content: [{ type: "text", text: m.text }, { type: "image_url", image_url: { url: m.image } }] };
    }
    return { role: m.role, content: m.text };
  });
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.busy || !state.current) return;
  addMessage({ role: "user", text: text, image: state.image });
  $("message").value = "";
  clearAttachment();
  await reply();
}

async function reply() {
  const message = { role: "assistant", text: "", image: null };
  const item = addMessage(message, "streaming");
  const textEl = item.querySelector(".text");
  let warnings = [];
  setBusy(true);
  state.abort = new AbortController();
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
      signal: state.abort.signal,
    });
    await readStream(response, (piece) => { message.text += piece; textEl.textContent = message.text; },
      (cuts) => { warnings = cuts; });
    item.dataset.state = "done";
    addRegenerate(item);
  } catch (error) {
    item.dataset.state = "error";
    if (error.name !== "AbortError") setStatus("chat-status", error.message, true);
    if (!message.text) { state.messages.pop(); item.remove(); }
  } finally {
    state.abort = null;
    setBusy(false);
    if (warnings.length) setStatus("chat-status", "note: " + warnings.join("; "));
  }
}

function requestBody() {
  const body = {
    model: state.current.model,
    messages: openAiMessages().slice(0, -1),  // the last entry is the reply being written
    stream: true,
    temperature: Number($("temperature").value || 0.8),
    max_tokens: Number($("max-tokens").value || 64),
    seed: Math.floor(Math.random() * 1e9),
  };
  const user = $("user-name").value.trim();
  if (user) body.user_name = user;
  return body;
}

// Server-sent events: lines of "data: {json}" separated by blank lines, ending with "data: [DONE]".
async function readStream(response, onPiece, onWarnings) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.warnings && onWarnings) onWarnings(chunk.warnings);  // how the card was cut to fit
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) onPiece(choice.delta.content);
      }
    }
  }
}

function addRegenerate(item) {
  for (const old of document.querySelectorAll(".actions")) old.remove();
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = document.createElement("button");
  button.className = "regenerate";
  button.textContent = "Regenerate";
  button.addEventListener("click", async () => {
    if (state.busy) return;
    state.messages.pop();
    item.remove();
    await reply();
  });
  actions.append(button);
  item.querySelector(".bubble").append(actions);
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  if (busy) setStatus("chat-status", state.current.name + " is writing ...");
  else if (!$("chat-status").classList.contains("error")) setStatus("chat-status", "");
}

function openSidebar(open) {
  $("sidebar").classList.toggle("open", open === undefined ? !$("sidebar").classList.contains("open") : open);
}

// ---- wiring ----------------------------------------------------------------------------------

function init() {
  $("api-key").value = localStorage.getItem("personae.apiKey") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("personae.apiKey", $("api-key").value.trim()); loadCharacters(); });
  $("composer").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("message").addEventListener("paste", (e) => {
    const file = Array.from(e.clipboardData.files || []).find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); attachImage(file); }
  });
  $("image-input").addEventListener("change", (e) => { if (e.target.files[0]) attachImage(e.target.files[0]); });
  $("remove-image").addEventListener("click", clearAttachment);
  $("card-input").addEventListener("change", (e) => { if (e.target.files[0]) uploadCard(e.target.files[0]); e.target.value = ""; });
  $("start-over").addEventListener("click", startOver);
  $("toggle-characters").addEventListener("click", () => openSidebar());
  loadCharacters();
}

init();
