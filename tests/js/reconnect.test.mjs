// Connection life: backoff with full jitter, close rules, refused handshakes, heartbeat, timeouts.
import assert from "node:assert/strict";
import { test } from "node:test";
import { STOP_CODES } from "../../starlette_replay/static/replay.js";
import { answerSubscribe, collect, event, setup } from "./harness.mjs";

const backoff = { initial: 100, max: 1000, factor: 2, resetAfter: 5000 };

/** Fail `n` handshakes in a row, returning the reconnect delay chosen after each. */
function failHandshakes(t, n) {
  const delays = [];
  for (let i = 0; i < n; i++) {
    t.ws().refuse();
    delays.push(t.reconnects.at(-1).delay);
    t.timers.advance(delays.at(-1));
  }
  return delays;
}

test("backoff grows exponentially up to max, at the top of the jitter range", () => {
  const t = setup({ random: () => 0.9999, client: { backoff } });
  collect(t.client, "t");
  const delays = failHandshakes(t, 7);
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999]);
});

test("full jitter: delays are random()*cap, so random()=0 retries at once", () => {
  const t = setup({ random: () => 0, client: { backoff } });
  collect(t.client, "t");
  assert.deepEqual(failHandshakes(t, 4), [0, 0, 0, 0]);
  assert.equal(t.sockets.length, 5);
});

test("backoff delays stay within [0, min(max, initial*factor^n)] for any random value", () => {
  let seed = 42;
  const random = () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  const t = setup({ random, client: { backoff } });
  collect(t.client, "t");
  const delays = failHandshakes(t, 40);
  delays.forEach((d, i) => {
    assert.ok(Number.isInteger(d) && d >= 0 && d < Math.min(1000, 100 * 2 ** i), `delay ${i} = ${d}`);
  });
  assert.ok(new Set(delays).size > 10, "the jitter spreads the delays");
});

test("the attempt count resets after a connection that stayed up for resetAfter", () => {
  const t = setup({ random: () => 0.9999, client: { backoff } });
  collect(t.client, "t");
  failHandshakes(t, 4); // the cap is up to 1000 now
  t.ws().accept();
  t.ws().serverClose(1006);
  assert.equal(t.reconnects.at(-1).delay, 999, "a short-lived connection does not reset the backoff");
  t.timers.advance(999);
  t.ws().accept();
  t.timers.advance(5000);
  t.ws().receive({ type: "ping" });
  t.ws().serverClose(1006);
  assert.equal(t.reconnects.at(-1).delay, 99, "back to the initial delay");
});

for (const code of [1001, 1006, 1011, 1012, 1013]) {
  test(`close ${code}: reconnect and resume from the cursor`, () => {
    const t = setup({ client: { backoff } });
    const { offsets, seen } = collect(t.client, "t");
    t.ws().accept();
    answerSubscribe(t.ws(), "t", { head: 0 });
    t.ws().receive(event("t", 1));
    t.ws().receive(event("t", 2));
    t.ws().serverClose(code, "bye");
    assert.equal(t.client.state, "reconnecting");
    assert.deepEqual(t.states.at(-1), {
      code,
      reason: "bye",
      attempt: 1,
      delay: 50,
      failures: 0,
      state: "reconnecting",
      previous: "open",
    });
    t.timers.advance(50);
    assert.equal(t.sockets.length, 2);
    t.ws().accept();
    const sent = t.ws().sentOf("subscribe")[0];
    assert.deepEqual([sent.epoch, sent.offset], ["e1", 2]);
    answerSubscribe(t.ws(), "t", { head: 3, replayed: 1 });
    t.ws().receive(event("t", 3));
    assert.deepEqual(offsets(), [1, 2, 3]);
    assert.equal(seen.gaps.length, 0);
    assert.deepEqual(t.states.map((s) => s.state), ["connecting", "open", "reconnecting", "open"]);
  });
}

for (const code of [1000, 1008, 1009]) {
  test(`close ${code} from the server: stop and report, no reconnect`, () => {
    const t = setup({ client: { backoff } });
    collect(t.client, "t");
    t.ws().accept();
    t.ws().serverClose(code, "because");
    assert.equal(t.client.state, "closed");
    assert.equal(t.states.at(-1).code, code);
    assert.equal(t.states.at(-1).byClient, false);
    assert.equal(t.errors.at(-1).kind, "closed");
    assert.match(t.errors.at(-1).message, new RegExp(`${code} \\(because\\)`));
    t.timers.advance(600_000);
    assert.equal(t.sockets.length, 1);
    // The app may decide to try again; the subscription is still there.
    t.client.connect();
    t.ws().accept();
    assert.equal(t.ws().sentOf("subscribe").length, 1);
  });
}

test("STOP_CODES is protocol.md's list: 1000, 1008, 1009", () => {
  assert.deepEqual([...STOP_CODES], [1000, 1008, 1009]);
});

test("a refused handshake (close 1006 before open) is retried and counted", () => {
  const t = setup({ client: { backoff } });
  collect(t.client, "t");
  t.ws().refuse();
  assert.equal(t.client.state, "reconnecting");
  assert.equal(t.client.failures, 1);
  assert.equal(t.states.at(-1).previous, "connecting");
  t.timers.advance(t.reconnects.at(-1).delay);
  t.ws().refuse();
  assert.equal(t.reconnects.at(-1).failures, 2);
  t.timers.advance(t.reconnects.at(-1).delay);
  t.ws().accept();
  assert.equal(t.client.failures, 0, "an open resets the count");
});

test("maxHandshakeFailures stops the client after that many failed handshakes in a row", () => {
  const t = setup({ client: { backoff, maxHandshakeFailures: 3 } });
  collect(t.client, "t");
  failHandshakes(t, 2);
  t.ws().refuse();
  assert.equal(t.client.state, "closed");
  assert.match(t.errors.at(-1).message, /gave up after 3 failed handshakes/);
  t.timers.advance(600_000);
  assert.equal(t.sockets.length, 3);
});

test("silence for twice the heartbeat interval closes the socket and reconnects", () => {
  const t = setup({ random: () => 0, client: { backoff, heartbeatInterval: 1000 } });
  collect(t.client, "t");
  const ws = t.ws();
  ws.accept();
  answerSubscribe(ws, "t");
  t.timers.advance(1999);
  assert.equal(t.client.state, "open");
  ws.receive({ type: "ping" }); // any frame proves the socket is alive
  t.timers.advance(1999);
  assert.equal(t.client.state, "open");
  t.timers.advance(1);
  assert.equal(ws.closedWith.code, 4000);
  assert.equal(ws.closedWith.reason, "heartbeat timeout");
  assert.equal(t.client.state === "reconnecting" || t.sockets.length === 2, true);
  assert.equal(t.sockets.length, 2, "random()=0: the next attempt started at once");
  // The dead socket's late events are ignored.
  ws.serverClose(1000);
  ws.receive(event("t", 1));
  assert.equal(t.client.state, "reconnecting");
});

test("a handshake that never opens is abandoned after connectTimeout", () => {
  const t = setup({ random: () => 0, client: { backoff, connectTimeout: 3000 } });
  collect(t.client, "t");
  t.timers.advance(2999);
  assert.equal(t.sockets.length, 1);
  t.timers.advance(1);
  assert.equal(t.sockets[0].closedWith.code, 4000);
  assert.equal(t.sockets.length, 2);
  assert.equal(t.client.failures, 1);
});

test("close() stops for good until connect(); connect() while waiting retries at once", () => {
  const t = setup({ random: () => 0.9999, client: { backoff } });
  collect(t.client, "t");
  t.ws().accept();
  t.ws().serverClose(1012);
  assert.equal(t.timers.delays().includes(99), true);
  t.client.connect(); // skip the wait
  assert.equal(t.sockets.length, 2);
  t.ws().accept();
  t.client.close();
  assert.equal(t.ws().closedWith.code, 1000);
  assert.equal(t.client.state, "closed");
  assert.equal(t.states.at(-1).byClient, true);
  assert.deepEqual(t.timers.delays(), [], "no timer left behind");
  t.client.connect();
  assert.equal(t.client.state, "connecting");
  assert.equal(t.sockets.length, 3);
});

test("a server that does not select replay.v1 is refused by the client", () => {
  const t = setup();
  collect(t.client, "t");
  t.ws().accept("");
  assert.equal(t.client.state, "closed");
  assert.match(t.errors.at(-1).message, /did not accept the replay.v1 subprotocol/);
});

test("subscribe() connects on first use unless autoConnect is false", () => {
  const t = setup({ client: { autoConnect: false } });
  collect(t.client, "t");
  assert.equal(t.sockets.length, 0);
  t.client.connect();
  assert.equal(t.sockets.length, 1);
});

test("the window's online event retries at once while waiting; close() removes the listener", () => {
  const listeners = new Map();
  globalThis.addEventListener = (type, fn) => listeners.set(type, fn);
  globalThis.removeEventListener = (type, fn) => listeners.get(type) === fn && listeners.delete(type);
  try {
    const t = setup({ random: () => 0.9999, client: { backoff } });
    collect(t.client, "t");
    t.ws().accept();
    t.ws().serverClose(1006);
    assert.equal(t.sockets.length, 1);
    listeners.get("online")();
    assert.equal(t.sockets.length, 2, "no wait for the backoff");
    listeners.get("online")(); // already dialing: nothing more
    assert.equal(t.sockets.length, 2);
    t.client.close();
    assert.equal(listeners.has("online"), false);
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("an async protocols function is awaited; close() while it is pending opens nothing", async () => {
  let release;
  const t = setup({ client: { protocols: () => new Promise((resolve) => (release = resolve)) } });
  collect(t.client, "t");
  assert.equal(t.sockets.length, 0);
  release(["token.1"]);
  await new Promise(setImmediate);
  assert.deepEqual(t.ws().protocols, ["replay.v1", "token.1"]);
  t.ws().accept();
  t.ws().serverClose(1012);
  t.timers.advance(1000);
  t.client.close();
  release(["token.2"]);
  await new Promise(setImmediate);
  assert.equal(t.sockets.length, 1, "closed before the token came: no socket");
  assert.equal(t.client.state, "closed");
});

test("a rejected protocols promise stops the client with a config error", async () => {
  const t = setup({ client: { protocols: () => Promise.reject(new Error("no token")) } });
  collect(t.client, "t");
  await new Promise(setImmediate);
  assert.equal(t.client.state, "closed");
  assert.equal(t.errors.at(-1).kind, "config");
  assert.match(t.errors.at(-1).message, /no token/);
});

test("a url function is called before every attempt", () => {
  let n = 0;
  const t = setup({ url: () => `ws://test/ws?attempt=${++n}` });
  collect(t.client, "t");
  t.ws().refuse();
  t.timers.advance(1000);
  assert.deepEqual(t.sockets.map((ws) => ws.url), ["ws://test/ws?attempt=1", "ws://test/ws?attempt=2"]);
});

test("close() with a code a browser refuses still closes the socket", () => {
  const t = setup();
  collect(t.client, "t");
  t.ws().accept();
  t.client.close(1001, "going away");
  assert.deepEqual(t.ws().closedWith, { code: undefined, reason: undefined });
  assert.equal(t.client.state, "closed");
});

test("a busy socket keeps one watchdog timer, not one per frame", () => {
  const t = setup({ client: { heartbeatInterval: 1000 } });
  collect(t.client, "t");
  t.ws().accept();
  answerSubscribe(t.ws(), "t");
  for (let n = 1; n <= 500; n++) {
    t.timers.advance(10);
    t.ws().receive(event("t", n));
  }
  assert.equal(t.timers.pending.size, 1);
  assert.equal(t.client.state, "open");
  t.timers.advance(2000);
  assert.equal(t.client.state, "reconnecting", "then silence still trips it");
});
