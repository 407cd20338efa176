"""Protocol fuzzing: hypothesis-generated client frames against the in-process endpoint.

One *fuzzer* connection (identity ``fuzzer``, allowed topics ``fuzzer:*``)
sends generated frames: valid ones, almost-valid ones (a valid frame with a
field dropped, retyped, or set to a huge/negative/float number), garbage text,
deeply nested JSON, unicode, and binary frames. After every fuzz frame it sends
a ``ping`` with a fresh ref and reads up to the matching ``pong``, so each
frame's answer is known exactly:

- every server frame parses (``parse_server_frame``) and is one of
  ``error``, ``subscribed``, ``unsubscribed``, ``pong``, ``event``;
- each fuzz frame gets at most one reply (an ``ack`` of a held topic gets none,
  as the protocol says); a ``ref`` in a reply is the one the frame carried;
- events arrive only for topics the fuzzer holds, with dense offsets starting
  right after ``subscribed``'s ``offset - replayed``: the fuzzing never breaks
  the no-gap/no-duplicate promise;
- the connection is never closed (the bad-frame budget and rate limit are
  raised for this connection's app; the close codes are tested on their own).

A *victim* connection (identity ``victim``, topic ``victim:a``) runs alongside
while a publisher feeds both identities' topics: the victim sees exactly its
own topic's events and the fuzzer never sees anything of ``victim:*``; the
victim's stored cursor is the one it acked. No log record at ERROR or above is
written and no connection is closed with 1011.

The run counts its fuzz frames (asserted >= 10,000) and prints the figure.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.websockets import WebSocket

from starlette_replay import Cursor, MemoryStore, Replay
from starlette_replay.protocol import Ack, parse_client_frame, parse_server_frame

FUZZ_FRAMES_MIN = 10_000
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "420"))  # ~28 frames an example: > 10,000 frames
TIMEOUT = 10.0
MAX_MESSAGE_SIZE = 65536
REPLY_TYPES = {"error", "subscribed", "unsubscribed", "pong"}
REAL_EPOCH = "<real epoch>"
OWN_TOPICS = ["fuzzer:a", "fuzzer:b", "fuzzer:c"]
VICTIM_TOPIC = "victim:a"


def identify(websocket: WebSocket) -> str | None:
    return websocket.query_params.get("id")


def authorize(websocket: WebSocket, topic: str) -> bool:
    identity = identify(websocket)
    return identity is not None and topic.startswith(f"{identity}:")


def make_app(**options: Any) -> tuple[Starlette, Replay]:
    # A short history keeps replays small and exercises cursors older than what is retained.
    store = MemoryStore(history_size=20)
    replay = Replay(store, identify=identify, authorize=authorize, heartbeat_interval=3600, **options)
    return Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan), replay


@asynccontextmanager
async def connect(app: Starlette, identity: str) -> AsyncIterator[AsyncWebSocketSession]:
    # One transport per client: httpx-ws shares one scope among a transport's connections.
    async with (
        httpx.AsyncClient(transport=ASGIWebSocketTransport(app), base_url="http://testserver") as client,
        aconnect_ws(
            f"/ws?id={identity}", client, subprotocols=["replay.v1"], keepalive_ping_interval_seconds=None
        ) as ws,
    ):
        yield ws


# --- frame strategies ----------------------------------------------------------------

HUGE_NUMBERS = st.sampled_from(
    [-1, 2**53, 2**53 - 1, 2**63, 2**64 + 1, -(2**63), 10**300, 0.5, 1e308, -0.0, 1.0, True, False]
)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TOPICS = st.sampled_from([*OWN_TOPICS, VICTIM_TOPIC, "victim:b", "other", "", "a" * 257, "bad topic", "ü:ñ"]) | st.text(
    max_size=40
)
REFS = st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=70) | JSON_VALUES
OFFSETS = st.integers(0, 60) | HUGE_NUMBERS | JSON_VALUES
EPOCHS = st.sampled_from(["", "e", "x" * 300]) | st.text(max_size=20) | JSON_VALUES


@st.composite
def valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["subscribe", "subscribe", "unsubscribe", "ack", "ping"]))
    frame: dict[str, Any] = {"type": kind}
    if kind != "ping":
        frame["topic"] = draw(st.sampled_from([*OWN_TOPICS, *OWN_TOPICS, VICTIM_TOPIC]))
    if kind == "ack" or (kind == "subscribe" and draw(st.booleans())):
        # Mostly the topic's real epoch (filled in at send time), so that acks are
        # stored and resumes recover; sometimes any text.
        frame["epoch"] = draw(st.sampled_from([REAL_EPOCH, REAL_EPOCH, REAL_EPOCH]) | st.text(max_size=12))
        frame["offset"] = draw(st.integers(0, 60))
    if kind == "subscribe" and draw(st.booleans()):
        frame["rewind"] = draw(st.integers(0, 50))
    if draw(st.booleans()):
        frame["ref"] = draw(st.integers(0, 10**6) | st.text(max_size=64))
    return frame


@st.composite
def almost_valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    frame = draw(valid_frames())
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "retype", "number", "add", "type"]))
        key = draw(st.sampled_from(sorted(frame))) if frame else "type"
        if action == "drop":
            frame.pop(key, None)
        elif action == "retype":
            frame[key] = draw(JSON_VALUES)
        elif action == "number":
            frame[draw(st.sampled_from(["offset", "rewind", "ref", "epoch"]))] = draw(HUGE_NUMBERS)
        elif action == "add":
            frame[draw(st.sampled_from(["offset", "epoch", "rewind", "topic", "ref", "extra"]))] = draw(
                OFFSETS | EPOCHS | TOPICS | REFS
            )
        else:
            frame["type"] = draw(st.sampled_from(["Subscribe", "sub", "event", "pong", "subscribed", ""]) | JSON_VALUES)
    return frame


class Big(str):
    """A long frame with a short repr (hypothesis prints the failing example)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} chars: {str.__repr__(self[:40])}...{str.__repr__(self[-10:])}>"


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return Big("[" * depth + "]" * depth)
    if kind == "object":
        return Big('{"a":' * depth + "1" + "}" * depth)
    return Big('{"type":"ping","ref":' + "[" * depth + "]" * depth + "}")


UNICODE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)

FRAMES: st.SearchStrategy[str | bytes] = st.one_of(
    valid_frames().map(json.dumps),
    almost_valid_frames().map(json.dumps),
    almost_valid_frames().map(lambda f: json.dumps(f, ensure_ascii=False)),
    JSON_VALUES.map(json.dumps),
    UNICODE_TEXT,
    st.builds(nested, st.integers(1, 10_000), st.sampled_from(["list", "object", "ref"])),
    st.sampled_from(['{"type":"ping","ref":NaN}', '{"type":"ping","ref":Infinity}', Big("1" * 5000), '{"type":1e999}']),
    st.builds(
        lambda digits: '{"type":"ack","topic":"fuzzer:a","epoch":"e","offset":' + digits + "}",
        st.from_regex(r"-?[0-9]{1,400}", fullmatch=True),
    ),
    st.binary(max_size=300),
)


# --- the run's state and checks --------------------------------------------------------


@dataclass
class FuzzState:
    frames: int = 0
    replies: int = 0
    events: int = 0
    closes: int = 0
    sync: int = 0
    expected: dict[str, int] = field(default_factory=dict)  # topic -> next offset
    epochs: dict[str, str] = field(default_factory=dict)  # topic -> epoch, from subscribed frames
    acks_stored: int = 0
    trace: deque[tuple[str, str | bytes]] = field(default_factory=lambda: deque(maxlen=40))


def frame_ref(frame: str | bytes) -> tuple[bool, Any]:
    """(has a ref, the ref) for a frame that is a JSON object; (False, None) otherwise."""
    if isinstance(frame, bytes):
        return False, None
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return False, None
    if isinstance(obj, dict) and "ref" in obj:
        return True, obj["ref"]
    return False, None


def is_ack(frame: str | bytes) -> bool:
    if isinstance(frame, bytes):
        return False
    try:
        return isinstance(parse_client_frame(frame), Ack)
    except Exception:
        return False


def check_event(state: FuzzState, obj: dict[str, Any]) -> None:
    topic = obj["topic"]
    assert topic in state.expected, f"event of a topic the fuzzer does not hold: {obj}\n{list(state.trace)}"
    assert obj["offset"] == state.expected[topic], (
        f"gap or duplicate under fuzzing: {obj} vs {state.expected}\n" + "\n".join(map(repr, state.trace))
    )
    state.expected[topic] += 1
    state.events += 1


def with_real_epoch(frame: str | bytes, state: FuzzState) -> str | bytes:
    """Replace the REAL_EPOCH placeholder by the epoch the fuzzer saw for the frame's topic."""
    if isinstance(frame, bytes) or REAL_EPOCH not in frame:
        return frame
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return frame
    if isinstance(obj, dict) and obj.get("epoch") == REAL_EPOCH:
        topic = obj.get("topic")
        obj["epoch"] = state.epochs.get(topic, "never-seen") if isinstance(topic, str) else "never-seen"
        return json.dumps(obj)
    return frame


async def fuzz_one(ws: AsyncWebSocketSession, state: FuzzState, frame: str | bytes) -> None:
    frame = with_real_epoch(frame, state)
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_text(frame)
    state.frames += 1
    state.trace.append(("sent", frame if isinstance(frame, bytes) else frame[:300]))
    state.sync += 1
    sync_ref = f"sync-{state.sync}"
    await ws.send_text(json.dumps({"type": "ping", "ref": sync_ref}))
    has_ref, ref = frame_ref(frame)
    replies: list[dict[str, Any]] = []
    with anyio.fail_after(TIMEOUT):
        while True:
            text = await ws.receive_text()
            parse_server_frame(text)  # every server frame is well-formed
            obj = json.loads(text)
            state.trace.append(("got", text[:300]))
            kind = obj["type"]
            if kind == "pong" and obj.get("ref") == sync_ref:
                break
            if kind == "event":
                check_event(state, obj)
                continue
            assert kind in REPLY_TYPES, obj
            replies.append(obj)
            if "ref" in obj:
                assert has_ref and obj["ref"] == ref, (frame, obj)
            if kind == "error":
                assert obj["code"] in {"bad_request", "forbidden", "not_subscribed"}, obj
            elif kind == "subscribed":
                topic = obj["topic"]
                assert topic.startswith("fuzzer:"), obj
                state.expected[topic] = obj["offset"] - obj["replayed"] + 1
                state.epochs[topic] = obj["epoch"]
            elif kind == "unsubscribed":
                state.expected.pop(obj["topic"])
    state.replies += len(replies)
    assert len(replies) <= 1, f"{frame!r:.200} got {replies}"
    if not replies:
        assert is_ack(frame), f"no answer to {frame!r:.200}"
        state.acks_stored += 1


# --- the fuzz run --------------------------------------------------------------------


@contextmanager
def running_app(**options: Any) -> Iterator[tuple[anyio.from_thread.BlockingPortal, Starlette, Replay]]:
    app, replay = make_app(**options)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[Any]:
        # Built inside the event loop: LifespanManager needs one at construction.
        async with LifespanManager(app) as manager:
            yield manager.app

    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        with portal.wrap_async_context_manager(lifespan()) as asgi_app:
            yield portal, asgi_app, replay


def test_fuzzed_frames_are_answered_and_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="starlette_replay")
    state = FuzzState()
    victim_offsets: list[int] = []
    started = time.monotonic()
    with running_app(max_bad_frames=10**9, max_frame_rate=1e9, frame_burst=10**9) as (portal, app, replay):
        fuzzer = portal.wrap_async_context_manager(connect(app, "fuzzer"))
        victim = portal.wrap_async_context_manager(connect(app, "victim"))
        with fuzzer as fws, victim as vws:

            async def victim_subscribes() -> None:
                await vws.send_text(json.dumps({"type": "subscribe", "topic": VICTIM_TOPIC, "ref": "v"}))
                with anyio.fail_after(TIMEOUT):
                    reply = json.loads(await vws.receive_text())
                assert reply["type"] == "subscribed" and reply["offset"] == 0, reply

            portal.call(victim_subscribes)
            published = 0

            async def publish_round() -> None:
                nonlocal published
                published += 1
                for topic in (*OWN_TOPICS, VICTIM_TOPIC):
                    await replay.publish(topic, "tick", {"n": published, "secret": topic})

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                # The connection carries state from one example to the next, so a
                # shrunk re-run would not reproduce: report the first failure as is.
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(st.lists(FRAMES, min_size=20, max_size=40))
            def fuzz(frames: list[str | bytes]) -> None:
                portal.call(fuzz_many, frames)

            async def fuzz_many(frames: list[str | bytes]) -> None:
                await publish_round()
                for frame in frames:
                    await fuzz_one(fws, state, frame)

            fuzz()

            async def victim_reads() -> None:
                with anyio.fail_after(TIMEOUT):
                    while len(victim_offsets) < published:
                        obj = json.loads(await vws.receive_text())
                        assert obj["type"] == "event" and obj["topic"] == VICTIM_TOPIC, obj
                        assert obj["data"]["secret"] == VICTIM_TOPIC
                        victim_offsets.append(obj["offset"])
                    await vws.send_text(json.dumps({"type": "ack", "topic": VICTIM_TOPIC, "epoch": epoch, "offset": 7}))
                    await vws.send_text(json.dumps({"type": "ping", "ref": "end"}))
                    assert json.loads(await vws.receive_text()) == {"type": "pong", "ref": "end"}

            epoch = portal.call(replay.position, VICTIM_TOPIC).epoch
            portal.call(victim_reads)
            assert victim_offsets == list(range(1, published + 1))
            assert portal.call(replay.store.load_cursor, "victim", VICTIM_TOPIC) == Cursor(epoch, 7)
            stats = replay.stats()
            assert stats["connections"] == 2
    elapsed = time.monotonic() - started
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or "closing with" in r.getMessage()]
    assert not errors, [r.getMessage() for r in errors[:5]]
    print(
        f"\nfuzz: {state.frames} frames fuzzed ({state.replies} replies, {state.acks_stored} acks stored, "
        f"{state.events} events checked, "
        f"{published} publish rounds) in {elapsed:.1f}s"
    )
    assert state.frames >= FUZZ_FRAMES_MIN
    assert state.acks_stored > 0 and state.events > 0  # the valid paths were exercised too


def padded_ping(size: int, char: str) -> str:
    """A ping frame of exactly ``size`` UTF-8 bytes, padded in its ref with ``char``."""
    head = '{"type":"ping","ref":"'
    room = size - len(head) - 2
    width = len(char.encode())
    text = head + char * (room // width) + "a" * (room % width) + '"}'
    assert len(text.encode()) == size
    return text


@pytest.mark.anyio
@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
async def test_frame_size_limit_is_counted_in_utf8_bytes(char: str, caplog: pytest.LogCaptureFixture) -> None:
    """At the limit: an answer (the ref is too long: ``bad_request``); one byte over: close 1009."""
    app, _ = make_app(max_message_size=4096)
    async with LifespanManager(app) as manager:
        async with connect(manager.app, "fuzzer") as ws, connect(manager.app, "victim") as bystander:
            await ws.send_text(padded_ping(4096, char))
            with anyio.fail_after(TIMEOUT):
                reply = json.loads(await ws.receive_text())
            assert (reply["type"], reply["code"]) == ("error", "bad_request")
            await ws.send_text(padded_ping(4097, char))
            with anyio.fail_after(TIMEOUT), pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive_text()
            assert closed.value.code == 1009
            await bystander.send_text('{"type":"ping","ref":1}')
            with anyio.fail_after(TIMEOUT):
                assert json.loads(await bystander.receive_text()) == {"type": "pong", "ref": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
