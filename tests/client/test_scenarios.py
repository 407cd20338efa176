"""The client's rules as data: every scenario of ``tests/scenarios/*.json`` run against the pure core.

The same files run against the browser client (``tests/js/scenarios.test.mjs``). A scenario
names the topics the client holds (with a cursor or none), then steps: ``open`` (a connection
opened), ``recv`` (a server frame; ``"$s:T"`` stands for the ref of the last subscribe sent for
topic T), ``close`` (the server closed with a code), ``advance`` (seconds pass). Each step lists
what the client must do, as actions: ``send`` (a frame, compared without its ref, which every
frame must carry), ``deliver``, ``reset``, ``report`` (an error frame reached the app),
``refused``, ``reconnect``, ``stop``. Actions of one kind are compared in order.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from starlette_replay._client.backoff import Backoff
from starlette_replay._client.core import (
    Action,
    ClientCore,
    Confirmed,
    Deliver,
    ErrorReceived,
    Pacer,
    Refused,
    RetrySubscribe,
    Send,
    TopicState,
    close_stop,
)
from starlette_replay.protocol import parse_server_frame
from starlette_replay.stores.base import Cursor

SCENARIOS = Path(__file__).parents[1] / "scenarios"
# The Python client's defaults (ReplayClient: max_frame_rate=50, frame_burst=100).
PACE = {"rate": 50, "burst": 100}


def _cases() -> list[Any]:
    cases = []
    for path in sorted(SCENARIOS.glob("*.json")):
        for scenario in json.loads(path.read_text())["scenarios"]:
            cases.append(pytest.param(scenario, id=f"{path.stem}: {scenario['name']}"))
    return cases


class Runner:
    """The I/O around the core, played on a virtual clock (milliseconds, integers: exact)."""

    def __init__(self, scenario: dict[str, Any]) -> None:
        self.core = ClientCore(Backoff(), rng=lambda: 0.5)
        for topic, cursor in scenario["topics"].items():
            start = Cursor(cursor["epoch"], cursor["offset"]) if cursor else None
            self.core.topics[topic] = TopicState(topic, start, 0)
        self.pace = scenario.get("pace", PACE)
        self.now = 0
        self.outbox: deque[str] = deque()
        self.pacer: Pacer | None = None
        self.pacer_at: int | None = None  # when the pacer allows the next frame
        self.timers: list[tuple[int, TopicState]] = []
        self.refs: dict[str, str] = {}
        self.out: list[dict[str, Any]] = []

    # --- the I/O side --------------------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.queue(action.frame)
            elif isinstance(action, Deliver):
                event = action.event
                self.out.append({"deliver": {"topic": event.topic, "epoch": event.epoch, "offset": event.offset}})
            elif isinstance(action, Confirmed):
                if action.reset is not None:
                    reset = action.reset
                    self.out.append({"reset": {"topic": reset.topic, "epoch": reset.epoch, "offset": reset.offset}})
            elif isinstance(action, ErrorReceived):
                self.out.append({"report": action.error.code})
            elif isinstance(action, RetrySubscribe):
                self.timers.append((self.now + math.ceil(action.delay * 1000), action.state))
            elif isinstance(action, Refused):
                self.out.append({"refused": action.state.name})

    def queue(self, frame: str) -> None:
        self.outbox.append(frame)
        self.drain()

    def drain(self) -> None:
        assert self.pacer is not None, "a frame was sent with no connection open"
        while self.outbox:
            wait = self.pacer.take(self.now / 1000)
            if wait > 0:
                self.pacer_at = self.now + math.ceil(wait * 1000)
                return
            frame = json.loads(self.outbox.popleft())
            assert "ref" in frame, f"a frame without ref: {frame}"
            ref = frame.pop("ref")
            if frame["type"] == "subscribe":
                self.refs[frame["topic"]] = ref
            self.out.append({"send": frame})
        self.pacer_at = None

    def advance(self, ms: int) -> None:
        until = self.now + ms
        while True:
            due = [at for at, _ in self.timers]
            if self.pacer_at is not None:
                due.append(self.pacer_at)
            if not due or min(due) > until:
                break
            self.now = min(due)
            if self.pacer_at == self.now:
                self.drain()
            for timer in [t for t in self.timers if t[0] == self.now]:
                self.timers.remove(timer)
                self.apply(list(self.core.retry(timer[1])))
        self.now = until

    # --- steps ---------------------------------------------------------------------

    def step(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        self.out = []
        if "open" in step:
            self.pacer = Pacer(self.pace["rate"], self.pace["burst"], self.now / 1000)
            self.apply(list(self.core.connected()))
        elif "recv" in step:
            text = json.dumps(self.substitute(step["recv"]))
            self.apply(self.core.receive(parse_server_frame(text)))
        elif "close" in step:
            code = step["close"]
            self.core.disconnected()
            self.outbox.clear()
            self.pacer, self.pacer_at, self.timers = None, None, []
            stop = close_stop(None if code == 1006 else code)
            self.out.append({"stop": stop.code} if stop is not None else {"reconnect": True})
        elif "advance" in step:
            self.advance(round(step["advance"] * 1000))
        else:
            raise AssertionError(f"unknown step {step}")
        return self.out

    def substitute(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self.substitute(item) for key, item in value.items()}
        if isinstance(value, str) and value.startswith("$s:"):
            return self.refs[value[3:]]
        return value


def by_kind(actions: list[dict[str, Any]]) -> dict[str, list[Any]]:
    kinds: dict[str, list[Any]] = {}
    for action in actions:
        ((kind, value),) = action.items()
        kinds.setdefault(kind, []).append(value)
    return kinds


@pytest.mark.parametrize("scenario", _cases())
def test_scenario(scenario: dict[str, Any]) -> None:
    runner = Runner(scenario)
    for number, step in enumerate(scenario["steps"]):
        got = runner.step(step)
        assert by_kind(got) == by_kind(step["expect"]), f"step {number}: {step}"


def test_every_rule_has_scenarios() -> None:
    files = sorted(path.stem for path in SCENARIOS.glob("*.json"))
    assert files == ["close_codes", "contiguity", "pacing", "rate_limited", "refs", "subscribed", "time"]
    for path in SCENARIOS.glob("*.json"):
        content = json.loads(path.read_text())
        assert content["rule"] and content["protocol"] and content["scenarios"], path.name
