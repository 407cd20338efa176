// Test doubles for replay.js: a scripted WebSocket, a virtual clock, a storage.
import { ReplayClient } from "../../starlette_replay/static/replay.js";

/** Virtual timers: nothing runs until the test advances the clock. */
export class FakeTimers {
  constructor() {
    this.now = 0;
    this.seq = 0;
    /** @type {Map<number, { at: number, fn: () => void, ms: number }>} */
    this.pending = new Map();
  }
  setTimeout(fn, ms) {
    const id = ++this.seq;
    this.pending.set(id, { at: this.now + ms, fn, ms });
    return id;
  }
  clearTimeout(id) {
    this.pending.delete(id);
  }
  /** Delays of the timers that are waiting, sorted. */
  delays() {
    return [...this.pending.values()].map((t) => t.ms).sort((a, b) => a - b);
  }
  /** Move the clock forward by `ms`, running every timer that falls due, in order. */
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.pending) {
        if (t.at <= until && (next === null || t.at < next[1].at || (t.at === next[1].at && id < next[0]))) {
          next = [id, t];
        }
      }
      if (next === null) break;
      this.pending.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
    }
    this.now = until;
  }
}

export class MemoryStorage {
  constructor(entries = {}) {
    this.map = new Map(Object.entries(entries));
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
  removeItem(key) {
    this.map.delete(key);
  }
}

/** A WebSocket whose server side the test plays by hand. */
export class FakeWebSocket {
  static instances = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.protocol = "";
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.instances.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    // As browsers do: only 1000 and 3000-4999 may be sent by a page.
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new Error(`InvalidAccessError: close code ${code}`);
    }
    this.closedWith = { code, reason };
    this.readyState = 2;
  }
  // --- the server's side ---
  accept(protocol = "replay.v1") {
    this.protocol = protocol;
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame) {
    this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
  /** A failed handshake as a browser reports it (a 403 looks exactly like this). */
  refuse() {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code: 1006, reason: "", wasClean: false });
  }
  /** Frames sent of one type. */
  sentOf(type) {
    return this.sent.filter((f) => f.type === type);
  }
  lastSent() {
    return this.sent[this.sent.length - 1];
  }
}

/** A client wired to the fakes; `t.ws()` is the newest socket. */
export function setup(options = {}) {
  FakeWebSocket.instances = [];
  const timers = new FakeTimers();
  const storage = options.storage ?? new MemoryStorage();
  const states = [];
  const errors = [];
  const reconnects = [];
  const client = new ReplayClient(options.url ?? "ws://test/ws", {
    WebSocket: FakeWebSocket,
    timers,
    now: () => timers.now,
    random: options.random ?? (() => 0.5),
    storage,
    ...options.client,
  });
  client.on("state", (d) => states.push(d));
  client.on("error", (d) => errors.push(d));
  client.on("reconnect", (d) => reconnects.push(d));
  return {
    client,
    timers,
    storage,
    states,
    errors,
    reconnects,
    sockets: FakeWebSocket.instances,
    ws: () => FakeWebSocket.instances[FakeWebSocket.instances.length - 1],
  };
}

/** Subscribe `topic` and collect what the callbacks see. */
export function collect(client, topic, options = {}) {
  const seen = { events: [], subscribed: [], gaps: [], errors: [] };
  const sub = client.subscribe(topic, {
    onEvent: (e) => seen.events.push(e),
    onSubscribed: (i) => seen.subscribed.push(i),
    onGap: (i) => seen.gaps.push(i),
    onError: (e) => seen.errors.push(e),
    ...options,
  });
  return { sub, seen, offsets: () => seen.events.map((e) => e.offset) };
}

/** Answer the newest subscribe frame for `topic` as the server would. */
export function answerSubscribe(ws, topic, { epoch = "e1", head = 0, replayed = 0, resumed, recovered } = {}) {
  const frame = [...ws.sent].reverse().find((f) => f.type === "subscribe" && f.topic === topic);
  if (!frame) throw new Error(`no subscribe sent for ${topic}`);
  const hasCursor = frame.epoch !== undefined;
  ws.receive({
    type: "subscribed",
    topic,
    epoch,
    offset: head,
    resumed: resumed ?? hasCursor,
    recovered: recovered ?? (hasCursor && frame.epoch === epoch),
    replayed,
    ref: frame.ref,
  });
  return frame;
}

export function event(topic, offset, data = { n: offset }) {
  return { type: "event", topic, offset, event: "tick", data, time: 1700000000000 + offset };
}
