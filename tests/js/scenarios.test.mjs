// The client's rules as data: every scenario of tests/scenarios/*.json, run against replay.js.
// The same files run against the Python client's core (tests/client/test_scenarios.py), which
// describes the format.
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { test } from "node:test";
import { setup } from "./harness.mjs";

const DIR = new URL("../scenarios/", import.meta.url);

function* scenarios() {
  for (const file of readdirSync(DIR).filter((f) => f.endsWith(".json")).sort()) {
    const content = JSON.parse(readFileSync(new URL(file, DIR), "utf8"));
    for (const scenario of content.scenarios) yield [file.replace(/\.json$/, ""), scenario];
  }
}

/** Group actions by kind, keeping each kind's order (as the Python runner does). */
function byKind(actions) {
  const kinds = {};
  for (const action of actions) {
    const [[kind, value]] = Object.entries(action);
    (kinds[kind] ??= []).push(value);
  }
  return kinds;
}

class Runner {
  constructor(scenario) {
    const pace = scenario.pace ?? { rate: 50, burst: 100 };
    this.t = setup({
      random: () => 0.5,
      client: { heartbeatInterval: 0, connectTimeout: 0, maxFrameRate: pace.rate, frameBurst: pace.burst },
    });
    this.out = [];
    this.sentSeen = new Map();
    this.subs = [];
    this.t.client.on("error", (d) => {
      if (d.kind === "server") this.out.push({ report: d.code });
      else if (d.kind === "closed") this.out.push({ stop: d.code });
    });
    this.t.client.on("reconnect", () => this.out.push({ reconnect: true }));
    for (const [topic, cursor] of Object.entries(scenario.topics)) {
      const sub = this.t.client.subscribe(topic, {
        cursor,
        onEvent: (e) => this.out.push({ deliver: { topic: e.topic, epoch: e.epoch, offset: e.offset } }),
        onGap: (i) => this.out.push({ reset: { topic: i.topic, epoch: i.epoch, offset: i.offset - i.replayed } }),
        onError: (e) => this.out.push({ report: e.code }),
      });
      this.subs.push({ sub, refused: false });
    }
  }

  /** The ref of the last subscribe sent for `topic`, on any socket. */
  ref(topic) {
    const frames = this.t.sockets.flatMap((ws) => ws.sent).filter((f) => f.type === "subscribe" && f.topic === topic);
    return frames.at(-1).ref;
  }

  substitute(value) {
    if (Array.isArray(value)) return value.map((v) => this.substitute(v));
    if (value !== null && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, this.substitute(v)]));
    }
    if (typeof value === "string" && value.startsWith("$s:")) return this.ref(value.slice(3));
    return value;
  }

  step(step) {
    this.out = [];
    const { t } = this;
    if ("open" in step) {
      for (let i = 0; i < 120 && t.ws().readyState !== 0; i++) t.timers.advance(1000); // the reconnect's wait
      assert.equal(t.ws().readyState, 0, "no connection attempt to open");
      t.ws().accept();
    } else if ("recv" in step) {
      t.ws().receive(this.substitute(step.recv));
    } else if ("close" in step) {
      t.ws().serverClose(step.close, "scenario");
    } else if ("advance" in step) {
      t.timers.advance(Math.round(step.advance * 1000));
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
    for (const ws of t.sockets) {
      const seen = this.sentSeen.get(ws) ?? 0;
      for (const frame of ws.sent.slice(seen)) {
        const { ref, ...rest } = frame;
        assert.ok(typeof ref === "string" && ref.length > 0, `a frame without ref: ${JSON.stringify(frame)}`);
        this.out.push({ send: rest });
      }
      this.sentSeen.set(ws, ws.sent.length);
    }
    for (const entry of this.subs) {
      if (!entry.refused && entry.sub.state === "refused") {
        entry.refused = true;
        this.out.push({ refused: entry.sub.topic });
      }
    }
    return this.out;
  }
}

for (const [file, scenario] of scenarios()) {
  test(`scenario ${file}: ${scenario.name}`, () => {
    const runner = new Runner(scenario);
    scenario.steps.forEach((step, n) => {
      assert.deepEqual(byKind(runner.step(step)), byKind(step.expect), `step ${n}: ${JSON.stringify(step)}`);
    });
  });
}
