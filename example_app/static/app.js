// The demo page: a conversation with an agent on the topic user:<uid>, kept by replay.js.
import { ReplayClient } from "/replay.js";

const $ = (id) => document.getElementById(id);
const messages = $("messages");
const log = $("log");
const statusEl = $("status");
let offlineTimer = null;
let offlineUntil = 0;

// The snapshot: what the topic holds now, and the cursor it ends at.
const snapshot = await (await fetch("/api/history")).json();
const topic = snapshot.topic;
const offlineMs = Math.round((snapshot.agent_delay + 3) * 1000);

// --- transport: the one place that makes the client ---------------------------------------
// ?transport=sse reads the same stream from the SSE route (/sse); the default is the WebSocket (/ws).

const transport = new URLSearchParams(location.search).get("transport") === "sse" ? "sse" : "websocket";

function makeClient() {
  return new ReplayClient(transport === "sse" ? "/sse" : "/ws", {
    transport,
    autoConnect: false,
    heartbeatInterval: snapshot.heartbeat_interval * 1000, // must match the server's
  });
}

const other = transport === "sse" ? "websocket" : "sse";
$("transport").textContent = transport === "sse" ? "SSE" : "WebSocket";
$("switch").textContent = `use ${other === "sse" ? "SSE" : "WebSocket"}`;
$("switch").href = other === "sse" ? "?transport=sse" : "?";
document.body.dataset.transport = transport;

const client = makeClient();

// --- rendering: one element per event, tagged with its offset ------------------------

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// A streamed answer: the start marker makes the bubble, each token is a span in it
// (tagged with its offset), the final marker closes it and holds the whole text.
function answerBubble(taskId) {
  return messages.querySelector(`li.answer[data-task="${CSS.escape(taskId)}"]`);
}

function renderAnswer(e) {
  const taskId = e.data.task_id;
  if (e.event === "answer_start") {
    const li = document.createElement("li");
    li.className = "msg agent answer streaming";
    li.dataset.task = taskId;
    li.dataset.offset = String(e.offset);
    li.dataset.event = e.event;
    li.innerHTML = `<span class="text"></span><button type="button" class="stop">Stop</button>`;
    li.querySelector(".stop").addEventListener("click", () => stopTask(taskId, li));
    if (!e.live) li.classList.add("replayed");
    messages.append(li);
    li.scrollIntoView({ block: "end" });
    return;
  }
  const li = answerBubble(taskId);
  if (!li) return false; // no start marker on this page (an answer older than the snapshot)
  if (e.event === "answer_delta") {
    const tok = document.createElement("span");
    tok.className = "tok";
    tok.dataset.offset = String(e.offset);
    tok.textContent = e.data.text;
    li.querySelector(".text").append(tok);
    li.scrollIntoView({ block: "end" });
    return;
  }
  // the final marker: its text must be exactly the tokens shown (no repeat, no hole)
  const shown = li.querySelector(".text").textContent;
  li.classList.remove("streaming");
  li.classList.add(e.data.state);
  if (shown !== e.data.text) {
    li.classList.add("mismatch");
    console.error(`answer ${taskId}: tokens shown differ from the final text`);
  }
  li.querySelector(".stop")?.remove();
  const time = document.createElement("time");
  time.dataset.offset = String(e.offset);
  time.dataset.event = e.event;
  time.textContent = clock(e.time);
  li.append(time);
  messages.querySelector(`li.agent.working[data-task="${CSS.escape(taskId)}"]`)?.classList.add("finished");
}

async function stopTask(taskId, li) {
  li.querySelector(".stop").disabled = true;
  // Like a message, the stop is an HTTP request: it works while the socket is down.
  const r = await fetch("/api/stop", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ task_id: taskId }),
  });
  if (!r.ok) notice(`Stop failed: HTTP ${r.status}`);
}

function render(e) {
  if (e.event === "answer_start" || e.event === "answer_delta") return renderAnswer(e);
  if (e.event === "task_interaction" && e.data.state !== "working" && answerBubble(e.data.task_id)) {
    if (renderAnswer(e) !== false) return;
  }
  if (e.event === "stop_requested") {
    const li = answerBubble(e.data.task_id);
    if (li) li.classList.add("stopping");
    const mark = document.createElement("li");
    mark.hidden = true; // stored for the agent; shown as the bubble's state
    mark.dataset.offset = String(e.offset);
    mark.dataset.event = e.event;
    messages.append(mark);
    return;
  }
  const li = document.createElement("li");
  li.dataset.offset = String(e.offset);
  li.dataset.event = e.event;
  if (e.event === "agent_log") {
    li.className = "log-line";
    li.innerHTML = `<time></time> <span></span>`;
    li.querySelector("time").textContent = clock(e.time);
    li.querySelector("span").textContent = e.data.line;
    log.append(li);
    log.scrollTop = log.scrollHeight;
    return;
  }
  if (e.event === "user_message") {
    // Our own optimistic bubble, now stored: confirm it in place.
    const pending = messages.querySelector(`li.pending[data-client-id="${CSS.escape(e.data.client_id)}"]`);
    if (pending) pending.remove();
    li.className = "msg user";
    li.dataset.clientId = e.data.client_id;
    li.textContent = e.data.text;
  } else if (e.event === "task_interaction") {
    li.className = `msg agent ${e.data.state}`;
    li.dataset.task = e.data.task_id;
    // the final marker of an answer whose start this page never saw (older than its snapshot) shows its text
    li.textContent = e.data.state === "working" ? `Working on “${e.data.text}”…` : e.data.text;
    if (e.data.state !== "working") {
      messages.querySelector(`li.agent.working[data-task="${CSS.escape(e.data.task_id)}"]`)?.classList.add("finished");
    }
  } else {
    li.className = "msg other";
    li.textContent = `${e.event}: ${JSON.stringify(e.data)}`;
  }
  if (!e.live) li.classList.add("replayed");
  const time = document.createElement("time");
  time.textContent = clock(e.time);
  li.append(time);
  messages.append(li);
  li.scrollIntoView({ block: "end" });
}

function showCursor(epoch, offset) {
  $("cursor").textContent = `${epoch.slice(0, 6)}… / ${offset}`;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// --- connection status ----------------------------------------------------------------

client.on("state", (s) => {
  let label = s.state;
  if (s.state === "closed" && s.byClient && offlineUntil) label = "offline (dropped)";
  else if (s.state === "reconnecting") label = `reconnecting (attempt ${s.attempt})`;
  statusEl.textContent = label;
  statusEl.dataset.state = s.state;
  $("drop").hidden = s.state !== "open";
  $("reconnect").hidden = s.state === "open";
  if (s.state === "closed" && !s.byClient) notice(`Disconnected: ${s.reason || s.code}. Reload to try again.`);
});
client.on("reconnect", (r) => {
  statusEl.textContent = `reconnecting in ${(r.delay / 1000).toFixed(1)} s (attempt ${r.attempt})`;
});
client.on("error", (e) => console.warn("replay:", e.message, e));

$("drop").addEventListener("click", () => {
  offlineUntil = Date.now() + offlineMs;
  client.close(1000, "dropped by the demo");
  offlineTimer = setTimeout(goOnline, offlineMs);
});
$("reconnect").addEventListener("click", goOnline);

function goOnline() {
  clearTimeout(offlineTimer);
  offlineUntil = 0;
  client.connect();
}

// --- sending ----------------------------------------------------------------------------

$("compose").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text) return;
  const clientId = crypto.randomUUID().replaceAll("-", "");
  const li = document.createElement("li");
  li.className = "msg user pending";
  li.dataset.clientId = clientId;
  li.textContent = text;
  messages.append(li);
  input.value = "";
  // The message is an HTTP request: it goes through even while the socket is down.
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const r = await fetch("/api/messages", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ text, client_id: clientId }), // the id makes a retry safe
      });
      if (r.ok) return;
      if (r.status < 500) break;
    } catch {
      // network error: try again
    }
    await new Promise((done) => setTimeout(done, 500 * 2 ** attempt));
  }
  li.classList.add("failed");
});

// --- start: the snapshot, then the stream from the snapshot's cursor -------------------

for (const e of snapshot.events) render({ ...e, topic, live: false });

client.subscribe(topic, {
  cursor: snapshot.cursor,
  onEvent(e) {
    render(e);
    showCursor(e.epoch, e.offset);
  },
  onGap() {
    // History this page had is gone (a new epoch): the server now replays all it still
    // has, so start the view again from that replay.
    messages.replaceChildren();
    log.replaceChildren();
    notice("The server's history was reset; showing what it still has.");
  },
  onSubscribed(info) {
    showCursor(info.epoch, info.offset - info.replayed);
  },
  onError(err) {
    notice(`Server refused ${err.topic}: ${err.code} (${err.message})`);
  },
});
client.connect();
window.demo = { client }; // for the browser console (and the browser tests)
document.body.dataset.ready = "true";
