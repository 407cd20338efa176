"""Table tests of the client core's pure rules (the scenarios in tests/scenarios/ drive the machine)."""

from __future__ import annotations

import json

import pytest

from starlette_replay._client.backoff import Backoff
from starlette_replay._client.core import (
    ClientCore,
    Confirmed,
    Pacer,
    Send,
    TopicState,
    close_stop,
    follows,
    status_retryable,
)
from starlette_replay.protocol import Subscribed, parse_server_frame


@pytest.mark.parametrize(
    ("last", "offset", "rule"),
    [(0, 1, "next"), (4, 5, "next"), (4, 4, "duplicate"), (4, 1, "duplicate"), (4, 6, "gap"), (0, 2**53 - 1, "gap")],
)
def test_follows(last: int, offset: int, rule: str) -> None:
    assert follows(last, offset) == rule


@pytest.mark.parametrize(
    ("code", "stops"),
    [
        (None, False),  # no close frame (1006)
        (1000, True),
        (1001, False),
        (1002, False),
        (1003, False),
        (1006, False),
        (1007, False),
        (1008, True),
        (1009, True),
        (1011, False),
        (1012, False),
        (1013, False),
        (4000, False),
    ],
)
def test_close_codes(code: int | None, stops: bool) -> None:
    stop = close_stop(code, "why")
    assert (stop is not None) == stops
    if stop is not None:
        assert (stop.code, stop.reason) == (code, "why")


@pytest.mark.parametrize(
    ("status", "retry"), [(403, False), (404, False), (401, False), (408, True), (429, True), (500, True), (503, True)]
)
def test_handshake_statuses(status: int, retry: bool) -> None:
    assert status_retryable(status) == retry


def test_pacer_is_a_token_bucket_on_the_time_given() -> None:
    pacer = Pacer(4, 2, now=10.0)
    assert [pacer.take(10.0), pacer.take(10.0)] == [0.0, 0.0]
    assert pacer.take(10.0) == 0.25
    assert pacer.take(10.125) == 0.125
    assert pacer.take(10.25) == 0.0
    assert pacer.take(100.0) == 0.0  # refilled, never above the burst
    assert pacer.take(100.0) == 0.0
    assert pacer.take(100.0) > 0


def test_reconnect_backoff_grows_and_starts_again_after_a_healthy_session() -> None:
    core = ClientCore(Backoff(initial=1, max=8), rng=lambda: 1.0)
    delays = [core.reconnect_delay(healthy=False, trouble=False) for _ in range(5)]
    assert delays == [1, 2, 4, 8, 8]
    assert core.reconnect_delay(healthy=True, trouble=False) == 1
    assert core.reconnect_delay(healthy=True, trouble=True) == 2  # 1011/1013: the server is in trouble


def test_subscribe_sends_the_cursor_and_its_time_or_rewind() -> None:
    core = ClientCore(Backoff())
    fresh = TopicState("t", None, 5)
    assert core.subscribe(fresh) == Send('{"type":"subscribe","topic":"t","rewind":5,"ref":"s1"}')
    core.topics["t"] = fresh
    (confirmed,) = core.receive(Subscribed("t", "e1", 9, False, False, 5, "s1"))
    assert isinstance(confirmed, Confirmed) and confirmed.reset is None
    assert (fresh.epoch, fresh.offset, fresh.time) == ("e1", 4, None)
    fresh.time = 1234
    assert core.subscribe(fresh) == Send(
        '{"type":"subscribe","topic":"t","epoch":"e1","offset":4,"time":1234,"ref":"s2"}'
    )


SUBSCRIBED = {"type": "subscribed", "topic": "t", "epoch": "e", "offset": 1, "resumed": False, "recovered": False}
SUBSCRIBED["replayed"] = 0


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "event", "topic": "t", "offset": True, "event": "e", "data": 1, "time": 1},
        {"type": "event", "topic": "t", "offset": 1.0, "event": "e", "data": 1, "time": 1},
        {"type": "event", "topic": "t", "offset": -1, "event": "e", "data": 1, "time": 1},
        {"type": "event", "topic": "t", "offset": 2**53, "event": "e", "data": 1, "time": 1},
        {"type": "event", "topic": "t", "offset": 1, "event": 5, "data": 1, "time": 1},
        {"type": "event", "topic": "t", "offset": 1, "event": "e", "data": 1, "time": "1"},
        {"type": "event", "topic": 7, "offset": 1, "event": "e", "data": 1, "time": 1},
        {**SUBSCRIBED, "epoch": ""},
        {**SUBSCRIBED, "resumed": 0},
        {**SUBSCRIBED, "replayed": 2},
        {**SUBSCRIBED, "replayed": None},
        {**SUBSCRIBED, "ref": True},
        {"type": "error", "code": 1, "message": "m"},
        {"type": "error", "code": "c", "message": "m", "topic": 3},
        {"type": "nope"},
    ],
)
def test_ill_typed_server_frames_never_reach_the_core(frame: dict[str, object]) -> None:
    parse_server_frame(json.dumps(SUBSCRIBED))  # the frame the subscribed cases spoil
    with pytest.raises(ValueError):
        parse_server_frame(json.dumps(frame))
