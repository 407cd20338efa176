// Delivery: subscribe, dedup by offset, gap repair, the recovered:false callback, errors per topic, acks.
import assert from "node:assert/strict";
import { test } from "node:test";
import { answerSubscribe, collect, event, setup } from "./harness.mjs";

const withoutRefs = (frames) => frames.map(({ ref, ...frame }) => frame);

test("offers replay.v1 first, then the app's subprotocols", () => {
  const t = setup({ client: { protocols: ["token.abc"] } });
  collect(t.client, "user:1");
  assert.deepEqual(t.ws().protocols, ["replay.v1", "token.abc"]);
  assert.equal(t.ws().url, "ws://test/ws");
  assert.deepEqual(t.states.map((s) => s.state), ["connecting"]);
});

test("a protocols function is called before every attempt (a fresh token each time)", () => {
  let n = 0;
  const t = setup({ client: { protocols: () => [`token.${++n}`] } });
  collect(t.client, "user:1");
  t.ws().accept();
  t.ws().serverClose(1012);
  t.timers.advance(10_000);
  assert.deepEqual(t.sockets.map((ws) => ws.protocols[1]), ["token.1", "token.2"]);
});

test("subscribes on open and delivers events in order, each once", () => {
  const t = setup();
  const { seen, offsets } = collect(t.client, "user:1");
  t.ws().accept();
  assert.deepEqual(t.states.map((s) => s.state), ["connecting", "open"]);
  const frame = answerSubscribe(t.ws(), "user:1", { head: 2, replayed: 0 });
  assert.equal(frame.epoch, undefined, "no cursor yet: a fresh subscribe");
  assert.deepEqual(seen.subscribed[0].resumed, false);
  t.ws().receive(event("user:1", 3));
  t.ws().receive(event("user:1", 4, { text: "hi" }));
  assert.deepEqual(offsets(), [3, 4]);
  assert.deepEqual(seen.events[1], {
    topic: "user:1",
    epoch: "e1",
    offset: 4,
    event: "tick",
    data: { text: "hi" },
    time: 1700000000004,
    live: true,
  });
  assert.deepEqual(t.client.subscription("user:1").cursor, { epoch: "e1", offset: 4, time: 1700000000004 });
});

test("replayed events are flagged live:false, the ones after them live:true", () => {
  const t = setup();
  const { seen } = collect(t.client, "t", { rewind: 2 });
  t.ws().accept();
  assert.equal(t.ws().sentOf("subscribe")[0].rewind, 2);
  answerSubscribe(t.ws(), "t", { head: 5, replayed: 2 });
  for (const n of [4, 5, 6]) t.ws().receive(event("t", n));
  assert.deepEqual(seen.events.map((e) => [e.offset, e.live]), [[4, false], [5, false], [6, true]]);
});

test("duplicates (offset at or below the cursor) are dropped", () => {
  const t = setup();
  const { offsets } = collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t", { head: 0 });
  for (const n of [1, 2, 2, 1, 3, 3]) t.ws().receive(event("t", n));
  assert.deepEqual(offsets(), [1, 2, 3]);
  assert.equal(t.client.stats.duplicates, 3);
});

test("a hole makes the client subscribe again from its last good offset, then fills in", () => {
  const t = setup();
  const { offsets } = collect(t.client, "t");
  const ws = t.ws();
  ws.accept();
  answerSubscribe(ws, "t", { head: 0 });
  ws.receive(event("t", 1));
  ws.receive(event("t", 2));
  ws.receive(event("t", 4)); // 3 went missing
  const again = ws.lastSent();
  assert.equal(again.type, "subscribe");
  assert.equal(again.epoch, "e1");
  assert.equal(again.offset, 2);
  assert.equal(t.client.stats.gaps, 1);
  // Frames of the old subscription still in flight are ignored until the new `subscribed`.
  ws.receive(event("t", 5));
  answerSubscribe(ws, "t", { head: 5, replayed: 3 });
  for (const n of [3, 4, 5, 6]) ws.receive(event("t", n));
  assert.deepEqual(offsets(), [1, 2, 3, 4, 5, 6]);
});

test("a stale subscribed reply (older ref) is ignored", () => {
  const t = setup();
  const { seen } = collect(t.client, "t");
  const ws = t.ws();
  ws.accept();
  const first = ws.sentOf("subscribe")[0];
  answerSubscribe(ws, "t", { head: 0 });
  ws.receive(event("t", 1));
  ws.receive(event("t", 3)); // gap -> a second subscribe
  ws.receive({ type: "subscribed", topic: "t", epoch: "e1", offset: 9, resumed: false, recovered: false, replayed: 0, ref: first.ref });
  assert.equal(seen.subscribed.length, 1);
  ws.receive(event("t", 2)); // still waiting for the new reply: not delivered
  assert.deepEqual(seen.events.map((e) => e.offset), [1]);
});

test("resumed && !recovered calls onGap (refetch), and delivers what the server still has", () => {
  const storage = undefined;
  const t = setup({ storage });
  const { seen, offsets } = collect(t.client, "t", { cursor: { epoch: "old", offset: 7 } });
  t.ws().accept();
  const sent = answerSubscribe(t.ws(), "t", { epoch: "new", head: 2, replayed: 2, resumed: true, recovered: false });
  assert.deepEqual([sent.epoch, sent.offset], ["old", 7]);
  assert.equal(seen.gaps.length, 1);
  assert.deepEqual(seen.gaps[0].previous, { epoch: "old", offset: 7 });
  assert.equal(seen.gaps[0].epoch, "new");
  t.ws().receive(event("t", 1));
  t.ws().receive(event("t", 2));
  assert.deepEqual(offsets(), [1, 2], "offsets restart in the new epoch");
  assert.equal(seen.events[0].epoch, "new");
});

test("a fresh subscription (resumed: false) is not a gap", () => {
  const t = setup();
  const { seen } = collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t", { head: 3 });
  assert.equal(seen.gaps.length, 0);
  assert.equal(seen.subscribed.length, 1);
});

test("error frames go to the topic's onError; a forbidden subscribe is not retried", () => {
  const t = setup();
  const { sub, seen } = collect(t.client, "user:2");
  const ws = t.ws();
  ws.accept();
  const ref = ws.sentOf("subscribe")[0].ref;
  ws.receive({ type: "error", code: "forbidden", message: "no", topic: "user:2", ref });
  assert.deepEqual(seen.errors, [{ code: "forbidden", message: "no", topic: "user:2", ref }]);
  assert.equal(sub.state, "refused");
  ws.serverClose(1012);
  t.timers.advance(60_000);
  t.ws().accept();
  assert.equal(t.ws().sentOf("subscribe").length, 0, "a refused topic is not subscribed again");
  assert.equal(t.errors.length, 0);
});

test("an unavailable subscribe is retried with backoff on the same socket", () => {
  const t = setup({ random: () => 0.999 });
  const { sub, seen } = collect(t.client, "t");
  const ws = t.ws();
  ws.accept();
  const ref = ws.sentOf("subscribe")[0].ref;
  ws.receive({ type: "error", code: "unavailable", message: "store down", topic: "t", ref });
  assert.equal(seen.errors[0].code, "unavailable");
  assert.equal(sub.state, "pending");
  t.timers.advance(400);
  assert.equal(ws.sentOf("subscribe").length, 1);
  t.timers.advance(200);
  assert.equal(ws.sentOf("subscribe").length, 2);
  answerSubscribe(ws, "t", { head: 0 });
  assert.equal(sub.state, "active");
});

test("errors without a subscription go to the client's error listeners", () => {
  const t = setup();
  collect(t.client, "t");
  t.ws().accept();
  t.ws().receive({ type: "error", code: "bad_request", message: "frame is not valid JSON" });
  t.ws().receive("not json");
  t.ws().receive({ type: "mystery" });
  assert.deepEqual(t.errors.map((e) => [e.kind, e.code]), [["server", "bad_request"], ["protocol", undefined], ["protocol", undefined]]);
});

test("a throwing onEvent is reported and the stream goes on", () => {
  const t = setup();
  const got = [];
  t.client.subscribe("t", {
    onEvent: (e) => {
      got.push(e.offset);
      if (e.offset === 1) throw new Error("app bug");
    },
  });
  t.ws().accept();
  answerSubscribe(t.ws(), "t");
  t.ws().receive(event("t", 1));
  t.ws().receive(event("t", 2));
  assert.deepEqual(got, [1, 2]);
  assert.equal(t.errors[0].kind, "callback");
  assert.match(t.errors[0].message, /app bug/);
});

test("unsubscribe sends an unsubscribe and drops later frames of the topic", () => {
  const t = setup();
  const { sub, offsets } = collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t");
  t.ws().receive(event("t", 1));
  sub.unsubscribe();
  const { ref, ...unsubscribe } = t.ws().lastSent();
  assert.deepEqual(unsubscribe, { type: "unsubscribe", topic: "t" });
  assert.match(ref, /^u\d+$/, "every frame carries a ref");
  t.ws().receive(event("t", 2));
  assert.deepEqual(offsets(), [1]);
  assert.equal(sub.state, "closed");
  assert.equal(t.client.subscription("t"), undefined);
  assert.throws(() => t.client.subscribe("bad topic!"), TypeError);
  collect(t.client, "t");
  assert.throws(() => t.client.subscribe("t"), /already subscribed/);
});

test("acks are batched: one ack per topic per interval, with the latest offset", () => {
  const t = setup({ client: { ack: { interval: 1000 } } });
  collect(t.client, "a");
  collect(t.client, "b");
  const ws = t.ws();
  ws.accept();
  answerSubscribe(ws, "a");
  answerSubscribe(ws, "b");
  for (const n of [1, 2, 3]) ws.receive(event("a", n));
  ws.receive(event("b", 1));
  assert.equal(ws.sentOf("ack").length, 0);
  t.timers.advance(1000);
  assert.ok(ws.sentOf("ack").every((f) => /^a\d+$/.test(f.ref)), "every ack carries a ref");
  assert.deepEqual(withoutRefs(ws.sentOf("ack")), [
    { type: "ack", topic: "a", epoch: "e1", offset: 3, time: 1700000000003 },
    { type: "ack", topic: "b", epoch: "e1", offset: 1, time: 1700000000001 },
  ]);
  t.timers.advance(5000);
  assert.equal(ws.sentOf("ack").length, 2, "nothing new, no ack");
  ws.receive(event("a", 4));
  t.client.close();
  assert.deepEqual(withoutRefs(ws.sentOf("ack"))[2], { type: "ack", topic: "a", epoch: "e1", offset: 4, time: 1700000000004 }, "close flushes");
});

test("acks are off by default", () => {
  const t = setup();
  collect(t.client, "a");
  t.ws().accept();
  answerSubscribe(t.ws(), "a");
  t.ws().receive(event("a", 1));
  t.timers.advance(60_000);
  assert.equal(t.ws().sentOf("ack").length, 0);
});

test("resolveUrl maps http(s) and relative URLs to ws(s), against the page", async () => {
  const { resolveUrl } = await import("../../starlette_replay/static/replay.js");
  assert.equal(resolveUrl("wss://example.com/ws"), "wss://example.com/ws");
  globalThis.location = { href: "https://app.example.com/chat/room?x=1" };
  try {
    assert.equal(resolveUrl("/ws"), "wss://app.example.com/ws");
    assert.equal(resolveUrl("ws"), "wss://app.example.com/chat/ws");
    assert.equal(resolveUrl("http://other:8000/ws?t=1"), "ws://other:8000/ws?t=1");
  } finally {
    delete globalThis.location;
  }
});

test("an ack refused by its ref (rate_limited) is sent again at the next flush", () => {
  const t = setup({ client: { ack: { interval: 1000 } } });
  collect(t.client, "a");
  const ws = t.ws();
  ws.accept();
  answerSubscribe(ws, "a");
  ws.receive(event("a", 1));
  t.timers.advance(1000);
  const [ack] = ws.sentOf("ack");
  ws.receive({ type: "error", code: "rate_limited", message: "dropped", topic: "a", ref: ack.ref });
  t.timers.advance(1000);
  assert.deepEqual(withoutRefs(ws.sentOf("ack")), [
    { type: "ack", topic: "a", epoch: "e1", offset: 1, time: 1700000000001 },
    { type: "ack", topic: "a", epoch: "e1", offset: 1, time: 1700000000001 },
  ]);
  assert.notEqual(ws.sentOf("ack")[1].ref, ack.ref);
});

test("frames past the pacer's burst wait for tokens; close() sends what is queued first", () => {
  const t = setup({ client: { maxFrameRate: 10, frameBurst: 2 } });
  for (const topic of ["a", "b", "c", "d"]) collect(t.client, topic);
  const ws = t.ws();
  ws.accept();
  assert.deepEqual(ws.sentOf("subscribe").map((f) => f.topic), ["a", "b"]);
  t.timers.advance(100);
  assert.deepEqual(ws.sentOf("subscribe").map((f) => f.topic), ["a", "b", "c"]);
  t.client.close();
  assert.deepEqual(ws.sentOf("subscribe").map((f) => f.topic), ["a", "b", "c", "d"]);
  assert.deepEqual(t.timers.delays(), [], "no timer left behind");
});
