"""Replay lifecycle, stats, publishing and history."""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.to_thread
import pytest

from starlette_replay import (
    InvalidEvent,
    InvalidTopic,
    MemoryStore,
    NotRunning,
    Replay,
    ReplayError,
    allow_all,
)

from .helpers import TIMEOUT, connect, lifespan_of, make_app, running

pytestmark = pytest.mark.anyio

ZERO = {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}


async def test_shutdown_closes_open_connections_with_1001() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = make_app(replay)
    async with lifespan_of(app) as shutdown, connect(app) as a, connect(app) as b:
        await a.subscribe("t")
        await b.nothing_pending()
        assert replay.stats()["connections"] == 2
        await shutdown()  # what the server does on SIGTERM
        assert await a.closed() == 1001
        assert await b.closed() == 1001
        assert replay.stats() == ZERO
        assert not replay.running


async def test_stats_return_to_zero_after_many_cycles() -> None:
    replay = Replay(MemoryStore(history_size=50), authorize=allow_all, replay_page_size=5)
    async with running(make_app(replay)) as app:
        await replay.publish_many("busy", [("x", i) for i in range(50)])
        for i in range(30):
            async with connect(app) as c:
                await c.subscribe("busy")
                await c.subscribe(f"own:{i}")
                if i % 3 == 0:
                    await c.request({"type": "unsubscribe", "topic": "busy"})
                if i % 3 == 1:
                    # leave in the middle of a replay
                    await c.send({"type": "subscribe", "topic": "busy", "rewind": 50})
                    await c.recv_type("subscribed")
                stats = replay.stats()
                assert stats["connections"] == 1 and stats["subscriptions"] >= 1
            await replay.publish("busy", "x", i)
            assert replay.stats() == ZERO, i
        # the hub stopped listening on every topic
        assert replay.store._live == set()  # type: ignore[attr-defined]


async def test_publish_is_delivered_only_after_it_is_stored() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c:
        await c.subscribe("t")
        event = await replay.publish("t", "x", {"k": [1, 2]})
        assert (await replay.history("t")) == [event]
        (frame,) = await c.events(1)
        assert (frame["offset"], frame["data"], frame["time"]) == (event.offset, {"k": [1, 2]}, event.time)


# --- publish validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["", "a b", "x" * 257, 5, None, "caf\u00e9", "t\n"])
async def test_publish_invalid_topic(topic: Any) -> None:
    async with Replay(MemoryStore()) as replay:
        with pytest.raises(InvalidTopic) as info:
            await replay.publish(topic, "x", 1)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ReplayError)
        assert replay.store._topics == {}  # type: ignore[attr-defined]


class NotJson:
    pass


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("", 1),
        ("has space", 1),
        ("x" * 65, 1),
        (5, 1),
        ('q"uote', 1),
        ("ok", {1, 2}),
        ("ok", NotJson()),
        ("ok", math.nan),
        ("ok", {"x": math.inf}),
        ("ok", "\ud800"),  # a lone surrogate cannot go out as UTF-8
        ("ok", b"bytes"),
    ],
    ids=repr,
)
async def test_publish_invalid_event(event_type: Any, data: Any) -> None:
    async with Replay(MemoryStore()) as replay:
        with pytest.raises(InvalidEvent) as info:
            await replay.publish("t", event_type, data)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ReplayError)
        with pytest.raises(InvalidEvent):
            await replay.publish_many("t", [("ok", 1), (event_type, data)])
        assert await replay.history("t") == []


async def test_publish_over_max_event_size() -> None:
    async with Replay(MemoryStore(), max_event_size=1000) as replay:
        await replay.publish("t", "x", "a" * 800)
        with pytest.raises(InvalidEvent, match="max_event_size"):
            await replay.publish("t", "x", "a" * 1000)
        with pytest.raises(InvalidEvent, match="max_event_size"):
            await replay.publish("t", "x", "\u20ac" * 320)  # 320 characters, 960 bytes of UTF-8
        assert len(await replay.history("t")) == 1


async def test_publish_bad_idempotency_key() -> None:
    async with Replay(MemoryStore()) as replay:
        for key in ["", "k" * 257, 5]:
            with pytest.raises(InvalidEvent, match="idempotency_key"):
                await replay.publish("t", "x", 1, idempotency_key=key)  # type: ignore[arg-type]
        first = await replay.publish("t", "x", 1, idempotency_key="k")
        assert await replay.publish("t", "x", 2, idempotency_key="k") == first
        assert await replay.publish_many("t", []) == []


async def test_publish_before_start_and_after_close() -> None:
    replay = Replay(MemoryStore())
    with pytest.raises(NotRunning):
        await replay.publish("t", "x", 1)
    with pytest.raises(NotRunning):
        await replay.history("t")
    with pytest.raises(NotRunning):
        replay.publish_sync("t", "x", 1)
    async with replay:
        await replay.publish("t", "x", 1)
    with pytest.raises(NotRunning):
        await replay.publish("t", "x", 1)
    # validation comes first, whatever the state
    with pytest.raises(InvalidTopic):
        await replay.publish("bad topic", "x", 1)


async def test_publish_sync_from_a_worker_thread() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c:
        await c.subscribe("t")
        event = await anyio.to_thread.run_sync(lambda: replay.publish_sync("t", "x", {"from": "thread"}))
        assert event.offset == 1
        (frame,) = await c.events(1)
        assert frame["data"] == {"from": "thread"}
        with pytest.raises(InvalidTopic):
            await anyio.to_thread.run_sync(lambda: replay.publish_sync("bad topic", "x", 1))
        with pytest.raises(RuntimeError, match="event loop"):
            replay.publish_sync("t", "x", 1)


async def test_start_twice_refused_and_restart_gets_a_new_hub_state() -> None:
    replay = Replay(MemoryStore())
    async with replay:
        assert replay.running
        with pytest.raises(RuntimeError):
            await replay.__aenter__()
    assert not replay.running
    await replay.aclose()  # twice is fine
    async with replay:
        await replay.publish("t", "x", 1)


# --- history -------------------------------------------------------------------------------------------


async def test_history_paging() -> None:
    async with Replay(MemoryStore(history_size=250)) as replay:
        await replay.publish_many("t", [("x", i) for i in range(300)])
        page = await replay.history("t")
        assert [e.offset for e in page] == list(range(51, 151))
        seen = []
        after = None
        while True:
            page = await replay.history("t", after=after, limit=70)
            if not page:
                break
            seen += [e.data for e in page]
            after = page[-1].offset
        assert seen == list(range(50, 300))
        assert await replay.history("t", after=300) == []
        assert await replay.history("never") == []
        assert [e.offset for e in await replay.history("t", after=10, limit=2)] == [51, 52]


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": 10_001}, {"limit": True}, {"limit": 1.5}, {"after": -1}, {"after": "3"}, {"after": True}],
)
async def test_history_validation(kwargs: dict[str, Any]) -> None:
    async with Replay(MemoryStore()) as replay:
        with pytest.raises(ValueError):
            await replay.history("t", **kwargs)
    with pytest.raises(InvalidTopic):
        await replay.history("bad topic")


# --- constructor ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("send_queue_size", 0),
        ("send_queue_size", -1),
        ("send_queue_size", True),
        ("send_queue_size", 1.5),
        ("max_message_size", 0),
        ("max_subscriptions", 0),
        ("max_event_size", 0),
        ("replay_page_size", 0),
        ("max_bad_frames", 0),
        ("frame_burst", 0),
        ("heartbeat_interval", 0),
        ("heartbeat_interval", -1.0),
        ("heartbeat_interval", "25"),
        ("heartbeat_interval", math.nan),
        ("bad_frames_window", 0),
        ("max_frame_rate", 0),
        ("close_timeout", 0),
    ],
)
def test_replay_constructor_validation(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        Replay(**{name: value})


def test_replay_constructor_types() -> None:
    with pytest.raises(TypeError, match="EventStore"):
        Replay(store=object())  # type: ignore[arg-type]
    replay = Replay(heartbeat_interval=0.5, allowed_origins=["https://a.example/"])
    assert isinstance(replay.store, MemoryStore)
    assert replay.allowed_origins == ["https://a.example"]
    assert "running=False" in repr(replay)


async def test_handshake_accepted_during_shutdown_is_closed_1001() -> None:
    """A socket accepted while aclose() runs must not be served by a stopped Replay."""
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = make_app(replay)
    accepting = anyio.Event()
    release = anyio.Event()
    sent: list[dict[str, Any]] = []
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](10)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.accept":
            accepting.set()
            await release.wait()
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return await app_inbox.receive()

    scope = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "subprotocols": ["replay.v1"],
        "state": {},
    }
    async with lifespan_of(app) as shutdown:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg, to_app, app_inbox:
                await to_app.send({"type": "websocket.connect"})
                tg.start_soon(app, scope, receive, send)
                await accepting.wait()
                await shutdown()
                release.set()
                await to_app.send({"type": "websocket.receive", "text": '{"type": "subscribe", "topic": "t"}'})
                await anyio.wait_all_tasks_blocked()
                await to_app.send({"type": "websocket.disconnect", "code": 1000})
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"], sent
    assert sent[-1]["code"] == 1001
    assert replay.stats() == ZERO
