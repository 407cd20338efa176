// @ts-check
/**
 * starlette_replay browser client: lossless pushes over WebSocket (or Server-sent events), wire protocol `replay.v1`.
 *
 * One ES module, no dependencies, no build step. Serve it with
 * `replay.client_route("/replay.js")` and import it from a page:
 *
 *     import { ReplayClient } from "/replay.js";
 *     const client = new ReplayClient("/ws");
 *     client.on("state", ({ state }) => (statusEl.textContent = state));
 *     client.subscribe("user:42", {
 *       onEvent: (e) => render(e),          // each event once, in offset order
 *       onGap: () => refetchFromServer(),   // resumed but history was lost: refetch
 *     });
 *
 * What it does for the app (see docs/browser.md):
 * - keeps a cursor (epoch + offset) per topic, in sessionStorage by default, and
 *   resumes from it on every reconnect and after a page reload;
 * - drops duplicates (offset at or below the cursor) and repairs holes (an offset
 *   that skips ahead makes it subscribe again from the last good offset);
 * - reports a gap (onGap) when the server says so (resumed && !recovered) and when
 *   the `subscribed` cannot continue its cursor (another epoch, or a start past it);
 * - reconnects with exponential backoff and full jitter on every close code but the
 *   STOP_CODES (1000 sent by the server, 1008, 1009), on which it stops;
 * - puts a `ref` on every frame and matches replies and errors by it;
 * - paces its own frames (a token bucket below the server's frame rate);
 * - treats a socket silent for twice the server's heartbeat interval as dead.
 *
 * The rules are the Python client's too: both run the scenarios of tests/scenarios/.
 *
 * `transport: "sse"` reads the same frames from the route `replay.sse_route()` serves
 * (a `text/event-stream`, read with `fetch` so that heartbeats and HTTP statuses are
 * seen), with the same API, the same cursors, dedup and gap handling. One stream
 * carries every topic; subscribing, unsubscribing or repairing a hole reopens it with
 * every topic's cursor (the stream has no client frames: no acks over SSE). A refusal
 * (HTTP 4xx) stops the client; a 5xx, a network error or a stream the server ended
 * reconnects with backoff.
 *
 * A refused handshake (HTTP 403) cannot be told apart from a network failure in
 * a browser: both are a close with 1006 before `open`. The client keeps retrying
 * with backoff, counts consecutive failed handshakes (`failures` in the state
 * event) and stops after `maxHandshakeFailures` (default: never).
 */

export const PROTOCOL = "replay.v1";
export const VERSION = "0.1.0";

/** Close codes after which the client stops instead of reconnecting. */
export const STOP_CODES = Object.freeze([1000, 1008, 1009]);

/** Close code (never on the wire) of an SSE stream that must be reopened at once with every subscription. */
const SSE_RESTART = 4100;

/** Error codes of a refused `subscribe` that are worth retrying (with backoff) on the same socket. */
const RETRY_SUBSCRIBE = new Set(["unavailable", "internal", "rate_limited"]);

const TOPIC_RE = /^[A-Za-z0-9_\-.:@/]{1,256}$/;
const MAX_OFFSET = Number.MAX_SAFE_INTEGER;

/**
 * @typedef {{ epoch: string, offset: number, time?: number }} Cursor  `time`: of the event at `offset`, when known
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} ConnectionState
 * @typedef {{ getItem(key: string): string | null, setItem(key: string, value: string): void,
 *   removeItem(key: string): void }} CursorStorage
 * @typedef {{ initial?: number, max?: number, factor?: number, resetAfter?: number }} BackoffOptions
 * @typedef {{ setTimeout(fn: () => void, ms: number): any, clearTimeout(handle: any): void }} Timers
 *
 * @typedef {Object} ReplayEvent
 * @property {string} topic
 * @property {string} epoch
 * @property {number} offset
 * @property {string} event  the event type given at publish
 * @property {any} data      the JSON payload
 * @property {number} time   the store's time, ms since the Unix epoch
 * @property {boolean} live  false while the server replays stored events after `subscribed`
 *
 * @typedef {Object} SubscribedInfo
 * @property {string} topic
 * @property {string} epoch
 * @property {number} offset     the topic's head when the subscription started
 * @property {boolean} resumed   the server started from a cursor
 * @property {boolean} recovered every event after that cursor will be delivered
 * @property {number} replayed   stored events that follow before live ones
 * @property {Cursor | null} previous  the cursor the client held before this subscription
 *
 * @typedef {Object} ServerError
 * @property {string} code      bad_request, forbidden, too_many_subscriptions, not_subscribed,
 *                              rate_limited, unavailable, internal
 * @property {string} message
 * @property {string} [topic]
 * @property {string | number} [ref]
 *
 * @typedef {Object} SubscribeOptions
 * @property {(event: ReplayEvent, sub: Subscription) => void} [onEvent]
 * @property {(info: SubscribedInfo, sub: Subscription) => void} [onSubscribed]
 * @property {(info: SubscribedInfo, sub: Subscription) => void} [onGap]
 * @property {(error: ServerError, sub: Subscription) => void} [onError]
 * @property {Cursor | null} [cursor]  start after this cursor (overrides the stored one)
 * @property {number} [rewind]         with no cursor: replay this many retained events first
 *
 * @typedef {Object} ClientOptions
 * @property {string[] | (() => string[] | Promise<string[]>)} [protocols]  app subprotocols offered after
 *   `replay.v1` (e.g. a token); a function is called before every connection attempt
 * @property {CursorStorage | null} [storage]  where cursors live; default sessionStorage, null: memory only
 * @property {string} [storageKey]   key prefix in storage, default "replay:"
 * @property {BackoffOptions} [backoff]  delays in ms: initial 500, max 30000, factor 2, resetAfter 10000
 * @property {number} [heartbeatInterval]  the server's heartbeat interval in ms (default 25000); 0 disables
 * @property {number} [connectTimeout]     ms before a handshake that has not opened is abandoned (10000)
 * @property {number} [maxHandshakeFailures]  consecutive failed handshakes before giving up (Infinity)
 * @property {boolean | { interval?: number }} [ack]  send batched `ack` frames (default off; interval 1000 ms)
 * @property {number} [maxFrameRate]  the client's own frames per second, paced (default 50: under the server's 100)
 * @property {number} [frameBurst]    frames the pacer lets through at once (default 100: under the server's 200)
 * @property {boolean} [autoConnect]  connect on the first subscribe() (default true)
 * @property {boolean} [reconnectOnOnline]  retry at once on the window's `online` event (default true)
 * @property {"websocket" | "sse"} [transport]  "sse": read the SSE route instead (default "websocket")
 * @property {any} [fetch]  the fetch function the SSE transport uses (tests pass a fake)
 * @property {any} [WebSocket]  the WebSocket constructor (tests pass a fake)
 * @property {Timers} [timers]  setTimeout/clearTimeout (tests pass fake timers)
 * @property {() => number} [random]  in [0, 1): the backoff jitter (tests pass a fixed one)
 * @property {() => number} [now]     ms clock
 */

/** @param {unknown} value @returns {value is Cursor} */
function isCursor(value) {
  if (value === null || typeof value !== "object") return false;
  const c = /** @type {Record<string, unknown>} */ (value);
  return (
    typeof c.epoch === "string" &&
    c.epoch.length > 0 &&
    typeof c.offset === "number" &&
    Number.isSafeInteger(c.offset) &&
    c.offset >= 0 &&
    c.offset <= MAX_OFFSET &&
    (c.time === undefined || (typeof c.time === "number" && Number.isSafeInteger(c.time)))
  );
}

/** A copy of a valid cursor, with its `time` only when it has one. @param {Cursor} c @returns {Cursor} */
function copyCursor(c) {
  return c.time === undefined ? { epoch: c.epoch, offset: c.offset } : { epoch: c.epoch, offset: c.offset, time: c.time };
}

/** @returns {CursorStorage | null} */
function defaultStorage() {
  try {
    // Reading sessionStorage throws in sandboxed frames and with storage disabled.
    return globalThis.sessionStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * Turn a relative or http(s) URL into a ws(s) URL, resolved against the page.
 * @param {string} url
 * @returns {string}
 */
export function resolveUrl(url) {
  const base = globalThis.location?.href;
  const resolved = base ? new URL(url, base) : new URL(url);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  else if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved.href;
}

/** An http(s) URL for the SSE transport, resolved against the page. @param {string} url @returns {string} */
function resolveHttpUrl(url) {
  const base = globalThis.location?.href;
  const resolved = base ? new URL(url, base) : new URL(url);
  if (resolved.protocol === "ws:") resolved.protocol = "http:";
  else if (resolved.protocol === "wss:") resolved.protocol = "https:";
  return resolved.href;
}

/**
 * The SSE route behind the WebSocket-shaped face the client drives (`send`, `close`, `onopen`,
 * `onmessage`, `onclose`, `readyState`, `protocol`).
 *
 * It "opens" at once, takes the `subscribe` frames the client sends on open, then requests
 * one stream for all of them (`topic` parameters, their cursors as `last_event_id`, the
 * largest `rewind` of the topics without one) and hands each `data:` frame to `onmessage`:
 * a `subscribed` gets the ref of its topic's subscribe, and a topic that asked for a smaller
 * `rewind` than the stream's has its `subscribed` narrowed and the extra replayed events
 * dropped, so the client sees exactly what the WebSocket route would have sent. Comments
 * (heartbeats) reach the client as `ping` frames. A later subscribe or unsubscribe closes it
 * with SSE_RESTART: the client reopens at once with every subscription. Acks are dropped.
 * @internal
 */
class SseSocket {
  /** @param {string} url @param {any} fetchImpl */
  constructor(url, fetchImpl) {
    this.url = url;
    this._fetch = fetchImpl;
    this.protocol = PROTOCOL;
    this.readyState = 0;
    /** true once the server answered 200 */ this.established = false;
    /** true when the server refused the stream (HTTP 4xx): retrying cannot help */ this.refused = false;
    /** true while no stream is requested (no subscription) */ this.idle = false;
    /** @type {null | { status: number, code?: string, message?: string }} */ this.refusal = null;
    /** @type {any} */ this.onopen = null;
    /** @type {any} */ this.onmessage = null;
    /** @type {any} */ this.onclose = null;
    /** @type {any} */ this.onerror = null;
    /** @type {any} */ this.onestablished = null;
    /** @type {"collecting" | "streaming" | "closed"} */ this._phase = "collecting";
    /** @type {Map<string, Record<string, any>>} the subscribe frames of this stream, by topic */
    this._batch = new Map();
    /** @type {Map<string, { ref: any, rewind: number | null, dropUntil: number }>} */
    this._topics = new Map();
    this._dropping = 0; // topics that still drop extra replayed events
    this._abort = typeof AbortController === "function" ? new AbortController() : null;
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
      queueMicrotask(() => this._start());
    });
  }

  /** @param {string} text */
  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    const frame = JSON.parse(text);
    if (frame.type !== "subscribe" && frame.type !== "unsubscribe") return; // ack, ping: no client frames
    if (this._phase !== "collecting") {
      this._closed(SSE_RESTART, "resubscribe");
      return;
    }
    if (frame.type === "subscribe") this._batch.set(frame.topic, frame);
    else this._batch.delete(frame.topic);
  }

  /** @param {number} [code] @param {string} [reason] */
  close(code = 1000, reason = "") {
    this._closed(code, reason);
  }

  /** @internal @param {number} code @param {string} reason */
  _closed(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._phase = "closed";
    this._abort?.abort();
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** @internal */
  _start() {
    if (this._phase !== "collecting" || this.readyState !== 1) return;
    this._phase = "streaming";
    const frames = [...this._batch.values()];
    if (frames.length === 0) {
      this.idle = true; // nothing to stream until the client subscribes (then it reopens)
      return;
    }
    const url = new URL(this.url);
    let rewind = 0;
    const entries = [];
    for (const f of frames) {
      url.searchParams.append("topic", f.topic);
      const fresh = f.epoch === undefined;
      if (fresh) rewind = Math.max(rewind, f.rewind ?? 0);
      entries.push(fresh ? "" : f.time === undefined ? `${f.epoch}:${f.offset}` : `${f.epoch}:${f.offset}:${f.time}`);
      this._topics.set(f.topic, { ref: f.ref, rewind: fresh ? (f.rewind ?? 0) : null, dropUntil: 0 });
    }
    if (rewind > 0) url.searchParams.set("rewind", String(rewind));
    if (entries.some((e) => e !== "")) url.searchParams.set("last_event_id", entries.join(","));
    /** @type {Record<string, any>} */
    const init = { headers: { Accept: "text/event-stream" }, cache: "no-store", credentials: "same-origin" };
    if (this._abort) init.signal = this._abort.signal;
    Promise.resolve()
      .then(() => this._fetch(url.href, init))
      .then((/** @type {any} */ response) => this._read(response))
      .catch((/** @type {unknown} */ error) => this._closed(1006, `stream failed: ${error}`));
  }

  /** @internal @param {any} response */
  async _read(response) {
    if (this.readyState === 3) return;
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        // not the route's JSON refusal (a proxy's page, say)
      }
      const message = body && typeof body.message === "string" ? `: ${body.message}` : "";
      if (response.status >= 400 && response.status < 500) {
        this.refused = true;
        this.refusal = { status: response.status, code: body?.code, message: body?.message };
        this._closed(1008, `HTTP ${response.status}${message}`);
      } else {
        this._closed(1013, `HTTP ${response.status}${message}`);
      }
      return;
    }
    this.established = true;
    this.onestablished?.();
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    /** @type {string[]} */
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (this.readyState === 3) {
        reader.cancel().catch(() => {});
        return;
      }
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r\n|\r|\n/)) !== -1) {
        if (buffer[cut] === "\r" && cut + 1 === buffer.length) break; // maybe the first half of a CRLF
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
        if (line === "") {
          if (data.length > 0) this._dispatch(data.join("\n"));
          data = [];
        } else if (line.startsWith(":") || line.startsWith("retry:")) {
          this._deliver('{"type":"ping"}'); // a heartbeat, or the stream's first line: it is alive
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // id: lines are the server's copy of the cursors this client keeps itself
        if (this.readyState === 3) return;
      }
    }
    this._closed(1006, "the server ended the stream");
  }

  /** @internal @param {string} text */
  _dispatch(text) {
    if (this._dropping === 0 && !text.startsWith('{"type":"subscribed"')) {
      this._deliver(text);
      return;
    }
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._deliver(text); // the client reports it
      return;
    }
    const topic = this._topics.get(frame?.topic);
    if (topic && frame.type === "subscribed") {
      frame.ref = topic.ref;
      if (frame.resumed === false && topic.rewind !== null && frame.replayed > topic.rewind) {
        // The stream replays the largest rewind asked for; this topic asked for fewer.
        topic.dropUntil = frame.offset - topic.rewind;
        frame.replayed = topic.rewind;
        this._dropping += 1;
      }
      this._deliver(JSON.stringify(frame));
      return;
    }
    if (topic && frame.type === "event" && topic.dropUntil > 0) {
      if (frame.offset <= topic.dropUntil) return;
      topic.dropUntil = 0;
      this._dropping -= 1;
    }
    this._deliver(text);
  }

  /** @internal @param {string} text */
  _deliver(text) {
    if (this.readyState === 1) this.onmessage?.({ data: text });
  }
}

/** One topic joined through a {@link ReplayClient}. Made by `client.subscribe()`. */
export class Subscription {
  /**
   * @param {ReplayClient} client
   * @param {string} topic
   * @param {SubscribeOptions} options
   * @param {Cursor | null} cursor
   */
  constructor(client, topic, options, cursor) {
    /** @readonly */ this.topic = topic;
    /** @internal */ this._client = client;
    /** @internal */ this._options = options;
    /** @internal @type {Cursor | null} */ this._cursor = cursor;
    /** @internal @type {string | null} ref of the subscribe awaiting its `subscribed` */
    this._pendingRef = null;
    /** @internal */ this._live = false;
    /** @internal events still to come from the replay */ this._replayLeft = 0;
    /** @internal @type {"pending" | "active" | "refused" | "closed"} */ this._state = "pending";
    /** @internal */ this._ackDirty = false;
    /** @internal */ this._retries = 0;
    /** @internal @type {any} */ this._retryTimer = null;
  }

  /** The last event's position (or where the subscription started), or null before the first `subscribed`. */
  get cursor() {
    return this._cursor ? copyCursor(this._cursor) : null;
  }

  /**
   * "pending" until the server confirms, "active" after `subscribed`, "refused" after a
   * refusal that retrying cannot fix (forbidden, bad_request, too_many_subscriptions),
   * "closed" after unsubscribe().
   * @returns {"pending" | "active" | "refused" | "closed"}
   */
  get state() {
    return this._state;
  }

  /** Leave the topic. The stored cursor is kept (subscribing again resumes from it). */
  unsubscribe() {
    this._client._unsubscribe(this);
  }
}

/**
 * A connection to a starlette_replay route that keeps its subscriptions alive across
 * reconnects. Events: "state" (connection state changes), "reconnect" (a retry was
 * scheduled), "error" (errors with no subscription to report to, callback exceptions,
 * storage failures, and the reason the client stopped).
 */
export class ReplayClient {
  /**
   * @param {string | URL | (() => string | URL)} url  ws(s)://, http(s):// or relative ("/ws")
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    this._url = url;
    this._protocols = options.protocols ?? [];
    this._storage = options.storage === undefined ? defaultStorage() : options.storage;
    this._storageKey = options.storageKey ?? "replay:";
    const backoff = options.backoff ?? {};
    this._backoff = {
      initial: backoff.initial ?? 500,
      max: backoff.max ?? 30000,
      factor: backoff.factor ?? 2,
      resetAfter: backoff.resetAfter ?? 10000,
    };
    if (!(this._backoff.initial > 0 && this._backoff.max >= this._backoff.initial && this._backoff.factor >= 1)) {
      throw new RangeError("backoff needs initial > 0, max >= initial and factor >= 1");
    }
    this._heartbeatInterval = options.heartbeatInterval ?? 25000;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._maxHandshakeFailures = options.maxHandshakeFailures ?? Infinity;
    const ack = options.ack ?? false;
    this._ackInterval = ack === false ? 0 : ack === true ? 1000 : (ack.interval ?? 1000);
    this._autoConnect = options.autoConnect ?? true;
    this._reconnectOnOnline = options.reconnectOnOnline ?? true;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    const transport = options.transport ?? "websocket";
    if (transport !== "websocket" && transport !== "sse") throw new RangeError('transport must be "websocket" or "sse"');
    this._sse = transport === "sse";
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    const timers = options.timers ?? globalThis;
    this._setTimeout = timers.setTimeout.bind(timers);
    this._clearTimeout = timers.clearTimeout.bind(timers);
    this._random = options.random ?? Math.random;
    this._now = options.now ?? Date.now;
    this._frameRate = options.maxFrameRate ?? 50;
    this._frameBurst = options.frameBurst ?? 100;
    if (!(this._frameRate > 0 && this._frameBurst >= 1)) throw new RangeError("maxFrameRate must be > 0, frameBurst >= 1");
    /** @type {Record<string, unknown>[]} frames waiting for the pacer */
    this._outbox = [];
    this._tokens = this._frameBurst;
    this._tokensAt = 0;

    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    /** @type {Map<string, Set<(detail: any) => void>>} */
    this._listeners = new Map();
    /** @type {ConnectionState} */
    this._state = "closed";
    /** @type {any} */ this._ws = null;
    this._wsOpened = false;
    this._started = false;
    this._generation = 0;
    this._attempt = 0;
    this._failures = 0;
    this._openedAt = 0;
    this._lastFrameAt = 0;
    this._refSeq = 0;
    this._storageFailed = false;
    /** @type {any} */ this._retryTimer = null;
    /** @type {any} */ this._watchdog = null;
    /** @type {any} */ this._connectTimer = null;
    /** @type {any} */ this._ackTimer = null;
    /** @type {any} */ this._paceTimer = null;
    this._onOnline = () => {
      if (this._state === "reconnecting" && this._retryTimer !== null) this.connect();
    };
    /** Counters for status displays and tests. */
    this.stats = { connects: 0, events: 0, duplicates: 0, gaps: 0, handshakeFailures: 0 };
  }

  /** @returns {ConnectionState} */
  get state() {
    return this._state;
  }

  /** Consecutive handshakes that failed before `open` (a refusal or the network). */
  get failures() {
    return this._failures;
  }

  /**
   * Listen to "state", "reconnect" or "error". Returns a function that removes the listener.
   * @param {"state" | "reconnect" | "error"} type
   * @param {(detail: any) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * Start connecting (from "closed"), or retry at once (while waiting to reconnect).
   * Does nothing while connecting or open.
   */
  connect() {
    this._started = true;
    if (this._state === "open" || this._state === "connecting") return;
    if (this._state === "reconnecting") {
      if (this._retryTimer !== null) {
        this._clear("_retryTimer");
        this._dial();
      }
      return;
    }
    this._attempt = 0;
    this._failures = 0;
    if (this._reconnectOnOnline) globalThis.addEventListener?.("online", this._onOnline);
    this._setState("connecting", {});
    this._dial();
  }

  /**
   * Close the connection and stop reconnecting. Subscriptions and cursors are kept:
   * `connect()` resumes them. Pending acks are sent first when the socket is open.
   * @param {number} [code] 1000 or 3000-4999
   * @param {string} [reason]
   */
  close(code = 1000, reason = "") {
    this._started = true;
    this._flushAcks();
    this._drain(true); // the last acks go out before the close, paced or not
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    this._teardown();
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        // A code a browser refuses (not 1000 or 3000-4999) or a reason over 123 bytes:
        // close anyway, or the socket would stay open, unowned.
        try {
          ws.close();
        } catch {
          // closing already
        }
      }
    }
    if (this._state !== "closed") this._setState("closed", { code, reason, byClient: true });
  }

  /**
   * Join `topic`. Events come to `options.onEvent` once each, in offset order, across
   * reconnects. Throws TypeError for a topic the protocol refuses, Error when this
   * client already holds the topic.
   * @param {string} topic
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(topic, options = {}) {
    if (typeof topic !== "string" || !TOPIC_RE.test(topic)) {
      throw new TypeError(`invalid topic ${JSON.stringify(topic)}: 1-256 characters of A-Z a-z 0-9 _ - . : @ /`);
    }
    if (this._subs.has(topic)) throw new Error(`already subscribed to ${topic}; unsubscribe first`);
    if (options.cursor != null && !isCursor(options.cursor)) {
      throw new TypeError("cursor must be { epoch: non-empty string, offset: integer >= 0 }");
    }
    const cursor = options.cursor ? copyCursor(options.cursor) : this._load(topic);
    const sub = new Subscription(this, topic, options, cursor);
    this._subs.set(topic, sub);
    if (options.cursor) this._save(sub);
    if (this._state === "open") this._sendSubscribe(sub);
    else if (this._autoConnect && !this._started) this.connect();
    return sub;
  }

  /** The subscription of `topic`, if this client holds one. @param {string} topic */
  subscription(topic) {
    return this._subs.get(topic);
  }

  /** @internal @param {Subscription} sub */
  _unsubscribe(sub) {
    if (this._subs.get(sub.topic) !== sub) return;
    this._subs.delete(sub.topic);
    this._clearSubTimer(sub);
    sub._state = "closed";
    if (sub._pendingRef !== null || sub._live) {
      this._send({ type: "unsubscribe", topic: sub.topic, ref: `u${++this._refSeq}` });
    }
    sub._pendingRef = null;
    sub._live = false;
  }

  // --- connection ------------------------------------------------------------------

  /** @internal */
  _dial() {
    const generation = ++this._generation;
    let protocols;
    try {
      protocols = typeof this._protocols === "function" ? this._protocols() : this._protocols;
    } catch (error) {
      this._fail(`protocols() threw: ${error}`, error);
      return;
    }
    if (protocols && typeof (/** @type {any} */ (protocols).then) === "function") {
      /** @type {Promise<string[]>} */ (protocols).then(
        (list) => {
          if (generation === this._generation && this._ws === null && this._state !== "closed") this._open(list);
        },
        (error) => {
          if (generation === this._generation && this._state !== "closed") this._fail(`protocols() failed: ${error}`, error);
        },
      );
      return;
    }
    this._open(/** @type {string[]} */ (protocols));
  }

  /** @internal @param {string[]} protocols */
  _open(protocols) {
    let ws;
    try {
      const raw = typeof this._url === "function" ? this._url() : this._url;
      if (this._sse) {
        ws = new SseSocket(resolveHttpUrl(String(raw)), this._fetch);
        ws.onestablished = () => {
          this._failures = 0;
          this._openedAt = this._now();
        };
      } else {
        ws = new this._WebSocket(resolveUrl(String(raw)), [PROTOCOL, ...protocols]);
      }
    } catch (error) {
      // A malformed URL or subprotocol (SyntaxError): retrying cannot help.
      this._fail(`cannot open a ${this._sse ? "stream" : "WebSocket"}: ${error}`, error);
      return;
    }
    this._ws = ws;
    this._wsOpened = false;
    ws.onopen = () => this._handleOpen(ws);
    ws.onmessage = (/** @type {{ data: unknown }} */ e) => this._handleMessage(ws, e.data);
    ws.onclose = (/** @type {{ code: number, reason: string }} */ e) => this._handleClose(ws, e.code, e.reason);
    ws.onerror = () => {}; // a close event always follows
    if (this._connectTimeout > 0) {
      this._connectTimer = this._setTimeout(() => {
        this._connectTimer = null;
        this._abandon(ws, "handshake timeout");
      }, this._connectTimeout);
    }
  }

  /** @internal @param {any} ws */
  _handleOpen(ws) {
    if (ws !== this._ws) return;
    this._clear("_connectTimer");
    if (ws.protocol !== PROTOCOL) {
      this._fail(`the server did not accept the ${PROTOCOL} subprotocol (got ${JSON.stringify(ws.protocol)})`);
      return;
    }
    this._wsOpened = true;
    this._openedAt = this._now();
    this._tokens = this._frameBurst;
    this._tokensAt = this._openedAt;
    if (ws.established !== false) this._failures = 0; // an SSE stream: once the server answered
    this.stats.connects += 1;
    this._armWatchdog();
    if (this._state !== "open") this._setState("open", {}); // an SSE stream reopened for a new subscription
    for (const sub of this._subs.values()) {
      if (sub._state !== "refused") this._sendSubscribe(sub);
    }
  }

  /** @internal @param {any} ws @param {number} code @param {string} reason */
  _handleClose(ws, code, reason) {
    if (ws !== this._ws) return;
    if (code === SSE_RESTART && this._state === "open") {
      this._teardown();
      this._dial(); // the stream's topics changed: reopen at once, with every subscription
      return;
    }
    if (ws.refused) {
      this._teardown();
      this._stop(code, reason, `the server refused the stream with ${reason}`);
      return;
    }
    const opened = this._wsOpened && ws.established !== false;
    this._teardown();
    if (!opened) {
      this._failures += 1;
      this.stats.handshakeFailures += 1;
      if (this._failures >= this._maxHandshakeFailures) {
        this._stop(code, reason, `gave up after ${this._failures} failed handshakes (refused, or the server is unreachable)`);
        return;
      }
    } else if (STOP_CODES.includes(code)) {
      this._stop(code, reason, `the server closed the connection with ${code}${reason ? ` (${reason})` : ""}`);
      return;
    } else if (this._now() - this._openedAt >= this._backoff.resetAfter) {
      this._attempt = 0;
    }
    this._scheduleReconnect(code, reason);
  }

  /**
   * Give up on a socket that is not answering: forget it, then reconnect as after a 1006.
   * @internal @param {any} ws @param {string} reason
   */
  _abandon(ws, reason) {
    if (ws !== this._ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(4000, reason);
    } catch {
      // closing already
    }
    this._handleClose(ws, 1006, reason);
  }

  /** @internal Forget the socket and every timer tied to it. */
  _teardown() {
    this._ws = null;
    this._wsOpened = false;
    this._clear("_connectTimer");
    this._clear("_watchdog");
    this._clear("_retryTimer");
    this._clear("_ackTimer");
    this._clear("_paceTimer");
    for (const frame of this._outbox) {
      // An ack that never left: send it on the next connection.
      const sub = frame.type === "ack" ? this._subs.get(/** @type {string} */ (frame.topic)) : undefined;
      if (sub) sub._ackDirty = true;
    }
    this._outbox = [];
    for (const sub of this._subs.values()) {
      sub._pendingRef = null;
      sub._live = false;
      this._clearSubTimer(sub);
    }
  }

  /**
   * The one backoff, for reconnects and refused subscribes: a random wait in
   * [0, min(max, initial * factor ** attempt)] ms (full jitter), as the Python client's Backoff.
   * @internal @param {number} attempt retries in a row before this one @returns {number}
   */
  _delay(attempt) {
    const { initial, max, factor } = this._backoff;
    return Math.floor(this._random() * Math.min(max, initial * factor ** attempt));
  }

  /** @internal @param {number} code @param {string} reason */
  _scheduleReconnect(code, reason) {
    const delay = this._delay(this._attempt);
    this._attempt += 1;
    const detail = { code, reason, attempt: this._attempt, delay, failures: this._failures };
    if (this._state !== "reconnecting") this._setState("reconnecting", detail);
    this._emit("reconnect", detail);
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._dial();
    }, delay);
  }

  /** @internal @param {number} code @param {string} reason @param {string} message */
  _stop(code, reason, message) {
    globalThis.removeEventListener?.("online", this._onOnline);
    this._setState("closed", { code, reason, byClient: false });
    this._emit("error", { kind: "closed", code, reason, message });
  }

  /** @internal @param {string} message @param {unknown} [error] */
  _fail(message, error) {
    const ws = this._ws;
    this._teardown();
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // closing already
      }
    }
    globalThis.removeEventListener?.("online", this._onOnline);
    this._setState("closed", { code: 0, reason: message, byClient: false });
    this._emit("error", { kind: "config", message, error });
  }

  /**
   * Note that a frame arrived; the watchdog closes the socket after twice the heartbeat
   * interval without one. One timer per silence, not one per frame: it re-arms itself
   * for the time left when frames came meanwhile.
   * @internal
   */
  _armWatchdog() {
    if (!(this._heartbeatInterval > 0) || this._ws?.idle) return;
    this._lastFrameAt = this._now();
    if (this._watchdog !== null) return;
    const ws = this._ws;
    const limit = 2 * this._heartbeatInterval;
    const check = () => {
      this._watchdog = null;
      if (ws?.idle) return; // an SSE stream with no topic: nothing to hear from
      const silent = this._now() - this._lastFrameAt;
      if (silent < limit) this._watchdog = this._setTimeout(check, limit - silent);
      else this._abandon(ws, "heartbeat timeout");
    };
    this._watchdog = this._setTimeout(check, limit);
  }

  /**
   * Queue a frame for the open socket; the pacer sends it (now, if the bucket has a token).
   * @internal @param {Record<string, unknown>} frame @returns {boolean} false when no socket is open
   */
  _send(frame) {
    const ws = this._ws;
    if (!ws || !this._wsOpened || ws.readyState !== 1) return false;
    if (this._sse) {
      // Nothing goes to the server (the stream's request carries the subscriptions): no pacing,
      // or the subscribes of many topics would miss the stream's first request.
      ws.send(JSON.stringify(frame));
      return true;
    }
    this._outbox.push(frame);
    if (this._paceTimer === null) this._drain(false);
    return true;
  }

  /**
   * Send queued frames while the token bucket allows (all of them with `force`), then wait for
   * the next token: the server drops frames past its rate, then closes with 1008.
   * @internal @param {boolean} force
   */
  _drain(force) {
    const ws = this._ws;
    if (!ws || !this._wsOpened || ws.readyState !== 1) return;
    this._clear("_paceTimer");
    while (this._outbox.length > 0) {
      const now = this._now();
      this._tokens = Math.min(this._frameBurst, this._tokens + ((now - this._tokensAt) * this._frameRate) / 1000);
      this._tokensAt = now;
      if (this._tokens < 1 && !force) {
        const wait = Math.ceil(((1 - this._tokens) * 1000) / this._frameRate);
        this._paceTimer = this._setTimeout(() => {
          this._paceTimer = null;
          this._drain(false);
        }, wait);
        return;
      }
      this._tokens -= 1;
      const frame = /** @type {Record<string, unknown>} */ (this._outbox.shift());
      try {
        ws.send(JSON.stringify(frame));
      } catch {
        return; // the close event will follow
      }
    }
  }

  /** @internal @param {Subscription} sub */
  _sendSubscribe(sub) {
    this._clearSubTimer(sub);
    const ref = `s${++this._refSeq}`;
    /** @type {Record<string, unknown>} */
    const frame = { type: "subscribe", topic: sub.topic, ref };
    if (sub._cursor) {
      frame.epoch = sub._cursor.epoch;
      frame.offset = sub._cursor.offset;
      // protocol.md, "Reused offsets": the time of the event at that offset lets the server tell
      // an offset reused for another event (after a failover that lost events) from ours.
      if (sub._cursor.time !== undefined) frame.time = sub._cursor.time;
    } else if (sub._options.rewind) {
      frame.rewind = sub._options.rewind;
    }
    sub._pendingRef = ref;
    sub._live = false;
    this._send(frame);
  }

  // --- frames ----------------------------------------------------------------------

  /** @internal @param {any} ws @param {unknown} data */
  _handleMessage(ws, data) {
    if (ws !== this._ws) return;
    this._armWatchdog();
    let frame;
    try {
      if (typeof data !== "string") throw new Error("binary frame");
      frame = JSON.parse(data);
      if (frame === null || typeof frame !== "object") throw new Error("not an object");
    } catch (error) {
      this._emit("error", { kind: "protocol", message: `unreadable frame from the server: ${error}` });
      return;
    }
    switch (frame.type) {
      case "event":
        this._handleEvent(frame);
        break;
      case "subscribed":
        this._handleSubscribed(frame);
        break;
      case "error":
        this._handleError(frame);
        break;
      case "ping":
      case "pong":
      case "unsubscribed":
        break; // the watchdog was rearmed above; nothing else to do
      default:
        this._emit("error", { kind: "protocol", message: `unknown frame type ${JSON.stringify(frame.type)}` });
    }
  }

  /** @internal @param {any} frame */
  _handleSubscribed(frame) {
    const sub = this._subs.get(frame.topic);
    // A reply to a subscribe this client has since replaced or left.
    if (!sub || sub._pendingRef === null || frame.ref !== sub._pendingRef) return;
    if (
      typeof frame.epoch !== "string" ||
      !Number.isSafeInteger(frame.offset) ||
      !Number.isSafeInteger(frame.replayed) ||
      frame.replayed < 0 ||
      frame.replayed > frame.offset
    ) {
      this._emit("error", { kind: "protocol", message: `malformed subscribed frame for ${frame.topic}` });
      return;
    }
    const previous = sub._cursor;
    const start = frame.offset - frame.replayed;
    // The server's flags say when it lost events; the offsets say it too: events after
    // `start` in `epoch` cannot continue a cursor of another epoch or one before `start`.
    const gap =
      (frame.resumed === true && frame.recovered !== true) ||
      (previous !== null && (previous.epoch !== frame.epoch || start > previous.offset));
    sub._pendingRef = null;
    sub._live = true;
    sub._state = "active";
    sub._retries = 0;
    sub._replayLeft = frame.replayed;
    // A replay from before the cursor brings events the app has had: the cursor stays, they are dropped.
    if (gap || previous === null) sub._cursor = { epoch: frame.epoch, offset: start };
    this._save(sub);
    /** @type {SubscribedInfo} */
    const info = {
      topic: frame.topic,
      epoch: frame.epoch,
      offset: frame.offset,
      resumed: frame.resumed,
      recovered: frame.recovered,
      replayed: frame.replayed,
      previous,
    };
    if (sub._ackDirty) this._scheduleAck();
    if (gap) this._call(sub, "onGap", info);
    this._call(sub, "onSubscribed", info);
  }

  /** @internal @param {any} frame */
  _handleEvent(frame) {
    const sub = this._subs.get(frame.topic);
    // Before our `subscribed` arrives, events belong to a subscription being replaced.
    if (!sub || !sub._live || !sub._cursor) return;
    const offset = frame.offset;
    if (!Number.isSafeInteger(offset)) {
      this._emit("error", { kind: "protocol", message: `event without an integer offset on ${frame.topic}` });
      return;
    }
    const last = sub._cursor.offset;
    if (offset <= last) {
      this.stats.duplicates += 1;
      return;
    }
    if (offset > last + 1) {
      // A hole: ask again from the last event we have; the server replays the rest.
      this.stats.gaps += 1;
      this._sendSubscribe(sub);
      return;
    }
    const live = sub._replayLeft <= 0;
    if (!live) sub._replayLeft -= 1;
    /** @type {ReplayEvent} */
    const event = {
      topic: frame.topic,
      epoch: sub._cursor.epoch,
      offset,
      event: frame.event,
      data: frame.data,
      time: frame.time,
      live,
    };
    this.stats.events += 1;
    this._call(sub, "onEvent", event);
    // The cursor moves once the app has had the event (even when its callback threw:
    // the exception went to the "error" listeners, and stopping here would stall the topic).
    sub._cursor = Number.isSafeInteger(event.time)
      ? { epoch: event.epoch, offset, time: event.time }
      : { epoch: event.epoch, offset };
    this._save(sub);
    if (this._ackInterval > 0 && this._subs.get(sub.topic) === sub) {
      sub._ackDirty = true;
      this._scheduleAck();
    }
  }

  /** @internal @param {any} frame */
  _handleError(frame) {
    /** @type {ServerError} */
    const error = { code: frame.code, message: frame.message };
    if (frame.topic !== undefined) error.topic = frame.topic;
    if (frame.ref !== undefined) error.ref = frame.ref;
    const sub = typeof frame.topic === "string" ? this._subs.get(frame.topic) : undefined;
    if (sub && typeof frame.ref === "string" && frame.ref.startsWith("a")) {
      // An ack that was not stored (rate limited, ...): ack again at the next flush.
      sub._ackDirty = true;
      this._scheduleAck();
    }
    if (sub && frame.ref !== undefined && frame.ref === sub._pendingRef) {
      sub._pendingRef = null;
      if (RETRY_SUBSCRIBE.has(frame.code)) {
        const delay = this._delay(sub._retries);
        sub._retries += 1;
        sub._retryTimer = this._setTimeout(() => {
          sub._retryTimer = null;
          if (this._subs.get(sub.topic) === sub && this._state === "open") this._sendSubscribe(sub);
        }, delay);
      } else {
        sub._state = "refused";
      }
    }
    if (sub && sub._options.onError) this._call(sub, "onError", error);
    else this._emit("error", { kind: "server", ...error });
  }

  // --- acks ------------------------------------------------------------------------

  /** @internal */
  _scheduleAck() {
    if (this._ackTimer !== null || this._ackInterval <= 0) return;
    this._ackTimer = this._setTimeout(() => {
      this._ackTimer = null;
      this._flushAcks();
    }, this._ackInterval);
  }

  /** @internal */
  _flushAcks() {
    for (const sub of this._subs.values()) {
      if (sub._ackDirty && sub._live && sub._cursor) {
        const { epoch, offset, time } = sub._cursor;
        /** @type {Record<string, unknown>} */
        const frame = { type: "ack", topic: sub.topic, epoch, offset, ref: `a${++this._refSeq}` };
        if (time !== undefined) frame.time = time; // protocol.md, "Reused offsets": the stored cursor keeps it
        if (this._send(frame)) {
          sub._ackDirty = false;
        }
      }
    }
  }

  // --- cursors in storage ----------------------------------------------------------

  /** @internal @param {string} topic @returns {Cursor | null} */
  _load(topic) {
    if (!this._storage) return null;
    try {
      const raw = this._storage.getItem(this._storageKey + topic);
      if (raw === null) return null;
      const cursor = JSON.parse(raw);
      if (isCursor(cursor)) return copyCursor(cursor);
      this._storage.removeItem(this._storageKey + topic);
    } catch (error) {
      this._storageError(error);
    }
    return null;
  }

  /** @internal @param {Subscription} sub */
  _save(sub) {
    if (!this._storage || !sub._cursor) return;
    try {
      this._storage.setItem(this._storageKey + sub.topic, JSON.stringify(sub._cursor));
    } catch (error) {
      this._storageError(error);
    }
  }

  /** @internal @param {unknown} error */
  _storageError(error) {
    if (this._storageFailed) return; // once is enough: the cursor still lives in memory
    this._storageFailed = true;
    this._emit("error", { kind: "storage", message: `cursor storage failed: ${error}`, error });
  }

  // --- plumbing --------------------------------------------------------------------

  /** @internal @param {"_retryTimer" | "_watchdog" | "_connectTimer" | "_ackTimer" | "_paceTimer"} name */
  _clear(name) {
    if (this[name] !== null) {
      this._clearTimeout(this[name]);
      this[name] = null;
    }
  }

  /** @internal @param {Subscription} sub */
  _clearSubTimer(sub) {
    if (sub._retryTimer !== null) {
      this._clearTimeout(sub._retryTimer);
      sub._retryTimer = null;
    }
  }

  /** @internal @param {ConnectionState} state @param {Record<string, unknown>} detail */
  _setState(state, detail) {
    const previous = this._state;
    this._state = state;
    this._emit("state", { ...detail, state, previous, failures: this._failures });
  }

  /**
   * Call an app callback; an exception is reported as an "error" event, never thrown into the client.
   * @internal @param {Subscription} sub @param {"onEvent" | "onSubscribed" | "onGap" | "onError"} name @param {any} arg
   */
  _call(sub, name, arg) {
    const fn = sub._options[name];
    if (!fn) return;
    try {
      fn(arg, sub);
    } catch (error) {
      this._emit("error", { kind: "callback", message: `${name} for ${sub.topic} threw: ${error}`, topic: sub.topic, error });
    }
  }

  /** @internal @param {string} type @param {any} detail */
  _emit(type, detail) {
    const set = this._listeners.get(type);
    if (!set || set.size === 0) {
      if (type === "error") console.error("replay.js:", detail.message ?? detail.code, detail);
      return;
    }
    for (const listener of [...set]) {
      try {
        listener(detail);
      } catch (error) {
        console.error(`replay.js: a "${type}" listener threw`, error);
      }
    }
  }
}
