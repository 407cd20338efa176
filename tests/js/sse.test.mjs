// transport: "sse": one stream for every topic, cursors in last_event_id, the same dedup and gap
// handling as over WebSocket, refusals that stop, ends that reconnect, reopening on a new subscription.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ReplayClient } from "../../starlette_replay/static/replay.js";
import { FakeTimers, MemoryStorage } from "./harness.mjs";

const tick = () => new Promise((resolve) => setImmediate(resolve));

/** One request the client made; the test writes the server's side. */
class FakeStream {
  constructor(url, init) {
    this.url = new URL(url);
    this.init = init;
    this.aborted = false;
    init.signal?.addEventListener("abort", () => {
      this.aborted = true;
      try {
        this.controller?.error(new Error("aborted"));
      } catch {
        // closed already
      }
    });
    this.response = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
  }
  get topics() {
    return this.url.searchParams.getAll("topic");
  }
  param(name) {
    return this.url.searchParams.get(name);
  }
  /** Answer 200 and open the body. */
  accept() {
    const body = new ReadableStream({ start: (controller) => (this.controller = controller) });
    this._resolve({ ok: true, status: 200, body, json: async () => ({}) });
  }
  refuse(status, body = { type: "error", code: "forbidden", message: "refused" }) {
    this._resolve({ ok: false, status, body: null, json: async () => body });
  }
  fail() {
    this._reject(new TypeError("network error"));
  }
  write(text) {
    this.controller.enqueue(new TextEncoder().encode(text));
  }
  send(frame, id = "ignored") {
    this.write(`id: ${id}\ndata: ${JSON.stringify(frame)}\n\n`);
  }
  end() {
    this.controller.close();
  }
}

function setup(options = {}) {
  const timers = new FakeTimers();
  const streams = [];
  const states = [];
  const errors = [];
  const fetch = (url, init) => {
    const stream = new FakeStream(url, init);
    streams.push(stream);
    return stream.response;
  };
  const client = new ReplayClient("http://test/sse", {
    transport: "sse",
    fetch,
    timers,
    now: () => timers.now,
    random: () => 0.5,
    storage: options.storage ?? new MemoryStorage(),
    ...options.client,
  });
  client.on("state", (d) => states.push(d.state));
  client.on("error", (d) => errors.push(d));
  return { client, timers, streams, states, errors, stream: () => streams[streams.length - 1] };
}

function collect(client, topic, options = {}) {
  const seen = { events: [], subscribed: [], gaps: [] };
  client.subscribe(topic, {
    onEvent: (e) => seen.events.push(e),
    onSubscribed: (i) => seen.subscribed.push(i),
    onGap: (i) => seen.gaps.push(i),
    ...options,
  });
  return { seen, offsets: () => seen.events.map((e) => e.offset) };
}

const subscribed = (topic, head, replayed = 0, { epoch = "e1", resumed = false, recovered = false } = {}) => ({
  type: "subscribed",
  topic,
  epoch,
  offset: head,
  resumed,
  recovered,
  replayed,
});
const event = (topic, offset) => ({ type: "event", topic, offset, event: "tick", data: { n: offset }, time: 1000 + offset });

test("the topics subscribed in one turn share one stream; events arrive in order, each once", async () => {
  const t = setup();
  const a = collect(t.client, "a");
  const b = collect(t.client, "b");
  await tick();
  assert.equal(t.streams.length, 1);
  assert.deepEqual(t.stream().topics, ["a", "b"]);
  assert.equal(t.stream().param("last_event_id"), null);
  assert.equal(t.stream().init.headers.Accept, "text/event-stream");
  t.stream().accept();
  t.stream().write("retry: 2000\n\n");
  t.stream().send(subscribed("a", 0));
  t.stream().send(subscribed("b", 0));
  t.stream().send(event("a", 1));
  t.stream().send(event("b", 1));
  t.stream().send(event("a", 1)); // a duplicate
  t.stream().send(event("a", 2));
  await tick();
  assert.deepEqual(t.states, ["connecting", "open"]);
  assert.deepEqual(a.offsets(), [1, 2]);
  assert.deepEqual(b.offsets(), [1]);
  assert.equal(t.client.stats.duplicates, 1);
  assert.deepEqual(t.client.subscription("a").cursor, { epoch: "e1", offset: 2, time: 1002 });
});

test("a frame split across chunks and CRLF line ends are read as one", async () => {
  const t = setup();
  const a = collect(t.client, "a");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 0));
  const text = `id: x\r\ndata: ${JSON.stringify(event("a", 1))}\r\n\r\n`;
  t.stream().write(text.slice(0, 20));
  await tick();
  t.stream().write(text.slice(20));
  await tick();
  assert.deepEqual(a.offsets(), [1]);
});

test("a stream the server ends is reopened with backoff, with every cursor in last_event_id", async () => {
  const t = setup();
  collect(t.client, "a");
  const b = collect(t.client, "b");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 3));
  t.stream().send(subscribed("b", 0, 0, { epoch: "e2" }));
  t.stream().send(event("a", 4));
  t.stream().end();
  await tick();
  assert.deepEqual(t.states, ["connecting", "open", "reconnecting"]);
  t.timers.advance(1000);
  await tick();
  assert.equal(t.streams.length, 2);
  assert.equal(t.stream().param("last_event_id"), "e1:4:1004,e2:0");
  t.stream().accept();
  t.stream().send(subscribed("a", 5, 1, { resumed: true, recovered: true }));
  t.stream().send(event("a", 5));
  t.stream().send(subscribed("b", 1, 1, { epoch: "e2", resumed: true, recovered: true }));
  t.stream().send(event("b", 1));
  await tick();
  assert.equal(t.client.state, "open");
  assert.deepEqual(b.offsets(), [1]);
  assert.deepEqual(b.seen.gaps, []);
});

test("a resume that is not recovered calls onGap, as over WebSocket", async () => {
  const storage = new MemoryStorage({ "replay:a": JSON.stringify({ epoch: "old", offset: 7 }) });
  const t = setup({ storage });
  const a = collect(t.client, "a");
  await tick();
  assert.equal(t.stream().param("last_event_id"), "old:7");
  t.stream().accept();
  t.stream().send(subscribed("a", 2, 2, { epoch: "new", resumed: true, recovered: false }));
  t.stream().send(event("a", 1));
  t.stream().send(event("a", 2));
  await tick();
  assert.equal(a.seen.gaps.length, 1);
  assert.deepEqual(a.offsets(), [1, 2]);
});

test("a hole reopens the stream at once from the last good offset", async () => {
  const t = setup();
  const a = collect(t.client, "a");
  collect(t.client, "b");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 0));
  t.stream().send(subscribed("b", 0));
  t.stream().send(event("a", 1));
  t.stream().send(event("a", 3)); // 2 is missing
  t.stream().send(event("a", 4)); // after the hole: not delivered from this stream
  await tick();
  await tick();
  assert.equal(t.streams.length, 2, "reopened without waiting for a backoff timer");
  assert.ok(t.streams[0].aborted);
  assert.equal(t.stream().param("last_event_id"), "e1:1:1001,e1:0");
  assert.deepEqual(t.states, ["connecting", "open"], "a reopen is not a reconnect");
  t.stream().accept();
  t.stream().send(subscribed("a", 4, 3, { resumed: true, recovered: true }));
  for (const n of [2, 3, 4]) t.stream().send(event("a", n));
  await tick();
  assert.deepEqual(a.offsets(), [1, 2, 3, 4]);
  assert.equal(t.client.stats.gaps, 1);
});

test("subscribing while a stream is open reopens it with both topics; unsubscribing with one", async () => {
  const t = setup();
  const a = collect(t.client, "a");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 0));
  t.stream().send(event("a", 1));
  await tick();
  collect(t.client, "b", { rewind: 3 });
  await tick();
  await tick();
  assert.equal(t.streams.length, 2);
  assert.deepEqual(t.stream().topics, ["a", "b"]);
  assert.equal(t.stream().param("last_event_id"), "e1:1:1001,");
  assert.equal(t.stream().param("rewind"), "3");
  t.client.subscription("b").unsubscribe();
  await tick();
  await tick();
  assert.deepEqual(t.stream().topics, ["a"]);
  assert.deepEqual(a.offsets(), [1]);
});

test("a topic that asked for a smaller rewind than the stream's gets just its own", async () => {
  const t = setup();
  const a = collect(t.client, "a", { rewind: 1 });
  const b = collect(t.client, "b", { rewind: 3 });
  await tick();
  assert.equal(t.stream().param("rewind"), "3");
  t.stream().accept();
  t.stream().send(subscribed("a", 10, 3));
  for (const n of [8, 9, 10]) t.stream().send(event("a", n));
  t.stream().send(subscribed("b", 10, 3));
  for (const n of [8, 9, 10, 11]) t.stream().send(event("b", n));
  t.stream().send(event("a", 11));
  await tick();
  assert.equal(a.seen.subscribed[0].replayed, 1);
  assert.deepEqual(a.seen.events.map((e) => [e.offset, e.live]), [[10, false], [11, true]]);
  assert.deepEqual(b.offsets(), [8, 9, 10, 11]);
  assert.equal(t.client.stats.duplicates, 0);
});

test("a refusal (HTTP 403) stops the client and says why", async () => {
  const t = setup();
  collect(t.client, "secret");
  await tick();
  t.stream().refuse(403, { type: "error", code: "forbidden", message: "not allowed to subscribe to 'secret'" });
  await tick();
  await tick();
  assert.equal(t.client.state, "closed");
  const closed = t.errors.find((e) => e.kind === "closed");
  assert.equal(closed.code, 1008);
  assert.match(closed.message, /HTTP 403: not allowed to subscribe to 'secret'/);
  t.timers.advance(60_000);
  assert.equal(t.streams.length, 1, "no retry after a refusal");
});

test("a 503 and a network error are retried with backoff and counted as failed handshakes", async () => {
  const t = setup({ client: { maxHandshakeFailures: 2 } });
  collect(t.client, "a");
  await tick();
  t.stream().refuse(503, { type: "error", code: "unavailable", message: "not running" });
  await tick();
  await tick();
  assert.equal(t.client.state, "reconnecting");
  assert.equal(t.client.failures, 1);
  t.timers.advance(1000);
  await tick();
  t.stream().fail();
  await tick();
  await tick();
  assert.equal(t.client.state, "closed", "gave up after maxHandshakeFailures");
  assert.equal(t.streams.length, 2);
});

test("heartbeat comments keep the stream alive; silence reopens it", async () => {
  const t = setup({ client: { heartbeatInterval: 1000 } });
  collect(t.client, "a");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 0));
  await tick();
  for (let i = 0; i < 5; i++) {
    t.timers.advance(1500);
    t.stream().write(": ping\n\n");
    await tick();
  }
  assert.equal(t.streams.length, 1);
  assert.equal(t.client.state, "open");
  t.timers.advance(2001);
  await tick();
  assert.equal(t.client.state, "reconnecting");
  assert.ok(t.streams[0].aborted);
});

test("close() ends the stream and stops; acks are never sent over SSE", async () => {
  const t = setup({ client: { ack: { interval: 10 } } });
  collect(t.client, "a");
  await tick();
  t.stream().accept();
  t.stream().send(subscribed("a", 0));
  t.stream().send(event("a", 1));
  await tick();
  t.timers.advance(100);
  await tick();
  assert.equal(t.streams.length, 1, "an ack does not reopen the stream");
  t.client.close();
  await tick();
  assert.equal(t.client.state, "closed");
  assert.ok(t.streams[0].aborted);
});

test("many topics at once (past the pacer's burst) share the first stream", async () => {
  const t = setup();
  const topics = Array.from({ length: 150 }, (_, i) => `t${i}`);
  for (const topic of topics) collect(t.client, topic);
  await tick();
  await tick();
  assert.equal(t.streams.length, 1);
  assert.deepEqual(t.stream().topics, topics);
  t.stream().accept();
  for (const topic of topics) t.stream().send(subscribed(topic, 0));
  await tick();
  assert.equal(t.streams.length, 1, "no reopen");
  assert.ok(topics.every((topic) => t.client.subscription(topic).state === "active"));
});
