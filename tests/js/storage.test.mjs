// Cursors in (session) storage: a page reload resumes where the last page stopped.
import assert from "node:assert/strict";
import { test } from "node:test";
import { answerSubscribe, collect, event, MemoryStorage, setup } from "./harness.mjs";

test("a reload (a new client on the same storage) resumes from the stored cursor", () => {
  const storage = new MemoryStorage();
  const first = setup({ storage });
  collect(first.client, "user:1");
  first.ws().accept();
  answerSubscribe(first.ws(), "user:1", { head: 4 });
  first.ws().receive(event("user:1", 5));
  first.ws().receive(event("user:1", 6));
  const stored = { epoch: "e1", offset: 6, time: 1700000000006 };
  assert.equal(storage.getItem("replay:user:1"), JSON.stringify(stored), "the event's time is kept with the cursor");

  const second = setup({ storage });
  const { seen, offsets } = collect(second.client, "user:1");
  second.ws().accept();
  const sent = answerSubscribe(second.ws(), "user:1", { head: 7, replayed: 1 });
  assert.deepEqual([sent.epoch, sent.offset, sent.time], ["e1", 6, 1700000000006], "a reload resumes with the time");
  second.ws().receive(event("user:1", 7));
  assert.deepEqual(offsets(), [7]);
  assert.equal(seen.gaps.length, 0);
});

test("the subscribed position is stored at once, so a reload before any event misses nothing", () => {
  const storage = new MemoryStorage();
  const t = setup({ storage });
  collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t", { epoch: "e9", head: 12 });
  assert.deepEqual(JSON.parse(storage.getItem("replay:t")), { epoch: "e9", offset: 12 });
});

test("storageKey sets the prefix; storage: null keeps cursors in memory only", () => {
  const storage = new MemoryStorage();
  const t = setup({ storage, client: { storageKey: "app1/" } });
  collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t", { head: 1 });
  assert.deepEqual([...storage.map.keys()], ["app1/t"]);

  const m = setup({ client: { storage: null } });
  collect(m.client, "t");
  m.ws().accept();
  answerSubscribe(m.ws(), "t", { head: 1 });
  m.ws().receive(event("t", 2));
  m.ws().serverClose(1012);
  m.timers.advance(1000);
  m.ws().accept();
  assert.equal(m.ws().sentOf("subscribe")[0].offset, 2, "memory cursor still used on reconnect");
});

test("an explicit cursor wins over the stored one and is stored", () => {
  const storage = new MemoryStorage({ "replay:t": JSON.stringify({ epoch: "e1", offset: 3 }) });
  const t = setup({ storage });
  collect(t.client, "t", { cursor: { epoch: "e1", offset: 10 } });
  t.ws().accept();
  assert.deepEqual(t.ws().sentOf("subscribe")[0].offset, 10);
  assert.deepEqual(JSON.parse(storage.getItem("replay:t")), { epoch: "e1", offset: 10 });
  assert.throws(() => t.client.subscribe("u", { cursor: { epoch: "", offset: 1 } }), TypeError);
});

test("a corrupt stored cursor is dropped and the subscription starts fresh", () => {
  for (const bad of ["{not json", '{"epoch":"e1","offset":-1}', '{"epoch":"e1","offset":1.5}', '"x"', '{"offset":3}']) {
    const storage = new MemoryStorage({ "replay:t": bad });
    const t = setup({ storage });
    collect(t.client, "t");
    t.ws().accept();
    const sent = t.ws().sentOf("subscribe")[0];
    assert.equal(sent.epoch, undefined, bad);
    assert.equal(sent.offset, undefined, bad);
  }
});

test("a storage that throws (quota, disabled) is reported once; delivery goes on", () => {
  const storage = {
    getItem() {
      throw new Error("SecurityError");
    },
    setItem() {
      throw new Error("QuotaExceededError");
    },
    removeItem() {},
  };
  const t = setup({ storage });
  const { offsets } = collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t");
  for (const n of [1, 2, 3]) t.ws().receive(event("t", n));
  assert.deepEqual(offsets(), [1, 2, 3]);
  assert.deepEqual(t.errors.map((e) => e.kind), ["storage"]);
});

test("a new epoch replaces the stored cursor", () => {
  const storage = new MemoryStorage({ "replay:t": JSON.stringify({ epoch: "old", offset: 50 }) });
  const t = setup({ storage });
  const { seen } = collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t", { epoch: "new", head: 1, replayed: 1 });
  t.ws().receive(event("t", 1));
  assert.equal(seen.gaps.length, 1);
  assert.deepEqual(JSON.parse(storage.getItem("replay:t")), { epoch: "new", offset: 1, time: 1700000000001 });
});

test("a stored cursor with a malformed time is dropped; an app's cursor with a time is resumed with it", () => {
  const storage = new MemoryStorage({ "replay:t": JSON.stringify({ epoch: "e1", offset: 3, time: "x" }) });
  const t = setup({ storage });
  collect(t.client, "t");
  collect(t.client, "u", { cursor: { epoch: "e1", offset: 2, time: 1700000000002 } });
  t.ws().accept();
  const [first, second] = t.ws().sentOf("subscribe");
  assert.equal(first.epoch, undefined, "the malformed cursor was not used");
  assert.deepEqual([second.epoch, second.offset, second.time], ["e1", 2, 1700000000002]);
  assert.throws(() => t.client.subscribe("v", { cursor: { epoch: "e1", offset: 1, time: 1.5 } }), TypeError);
});
