"""Per-connection limits and the promises under load: heartbeat, frame size, bad frames,
frame rate, slow consumers, long replays, and the replay -> live hand-off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from starlette_replay import Event, MemoryStore, Replay, allow_all

from .helpers import TIMEOUT, Client, FakeWebSocket, connect, make_app, running, serve_fake

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app_for(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Replay, Any]]:
    options: dict[str, Any] = {"authorize": allow_all}
    marker = request.node.get_closest_marker("replay")
    store: Any = MemoryStore()
    if marker is not None:
        options.update(marker.kwargs)
        store = options.pop("store", store)
    replay = Replay(store, **options)
    async with running(make_app(replay)) as app:
        yield replay, app


@pytest.mark.replay(heartbeat_interval=0.05)
async def test_heartbeat_ping_when_idle(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        assert await c.recv() == {"type": "ping"}
        assert await c.recv() == {"type": "ping"}


async def test_binary_frame_is_bad_request(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        await c.send_bytes(b'{"type": "ping", "ref": 1}')
        error = await c.recv()
        assert (error["type"], error["code"]) == ("error", "bad_request")
        assert "binary" in error["message"]
        await c.nothing_pending()


@pytest.mark.replay(max_message_size=1000)
@pytest.mark.parametrize(
    "payload",
    [
        "x" * 1001,  # one byte over
        "\u20ac" * 334,  # 334 characters, 1002 bytes of UTF-8
    ],
    ids=["ascii", "multibyte"],
)
async def test_oversize_frame_closes_1009(app_for: tuple[Replay, Any], payload: str) -> None:
    replay, app = app_for
    async with connect(app) as c:
        await c.nothing_pending()
        await c.send_text(payload)
        assert await c.closed() == 1009
    assert replay.stats()["connections"] == 0


@pytest.mark.replay(max_message_size=1000)
async def test_oversize_binary_frame_closes_1009(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        await c.send_bytes(b"x" * 1001)
        assert await c.closed() == 1009


@pytest.mark.replay(max_message_size=1000)
async def test_frame_at_the_size_limit_is_handled(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        prefix = '{"type":"ping","ref":1,"pad":"'
        filler = "\u20ac" * ((1000 - len(prefix) - 2) // 3)
        text = prefix + filler + "a" * (1000 - len(prefix) - 2 - 3 * len(filler)) + '"}'
        assert len(text.encode()) == 1000
        await c.send_text(text)
        assert await c.recv() == {"type": "pong", "ref": 1}


@pytest.mark.replay(max_bad_frames=3)
async def test_bad_frames_past_the_budget_close_1008(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        for i in range(4):
            await c.send_text(f"bad frame {i}")
        for _ in range(3):
            assert (await c.recv())["code"] == "bad_request"
        assert await c.closed() == 1008


@pytest.mark.replay(max_bad_frames=3)
async def test_refused_frames_that_are_not_malformed_do_not_count(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        for _ in range(10):
            error = await c.request({"type": "unsubscribe", "topic": "t"})
            assert error["code"] == "not_subscribed"
        await c.nothing_pending()


@pytest.mark.replay(frame_burst=5, max_frame_rate=0.001)
async def test_frame_flood_rate_limited_then_1008(app_for: tuple[Replay, Any]) -> None:
    _, app = app_for
    async with connect(app) as c:
        for i in range(20):
            await c.send({"type": "ping", "ref": i})
        frames = []
        code = None
        with anyio.fail_after(TIMEOUT):
            while code is None:
                try:
                    frames.append(await c.recv())
                except Exception as exc:
                    code = getattr(exc, "code", None)
                    assert code is not None, exc
        assert frames[:5] == [{"type": "pong", "ref": i} for i in range(5)]
        assert [f.get("code") for f in frames[5:]] == ["rate_limited"] * 5
        assert code == 1008


# --- slow consumers, at the Connection level ---------------------------------------------------------


async def test_slow_consumer_closes_1013_while_others_keep_receiving() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=8)
    slow, fast = FakeWebSocket(), FakeWebSocket()
    async with replay, anyio.create_task_group() as tg:
        for name, ws in (("slow", slow), ("fast", fast)):
            tg.start_soon(serve_fake, replay, ws, name)
            await ws.client_sends({"type": "subscribe", "topic": "t"})
            await ws.wait_for(1)
            assert ws.sent[0]["type"] == "subscribed"
        slow.stalled = True
        for i in range(8):
            await replay.publish("t", "x", i)
            # a stalled socket does not slow the publisher down
        await fast.wait_for(9)
        assert slow.closed_with is None
        assert replay.stats()["queued_frames"] >= 7
        await replay.publish("t", "x", 8)
        await replay.publish("t", "x", 9)
        with anyio.fail_after(TIMEOUT):
            await slow.closed.wait()
        assert slow.closed_with is not None and slow.closed_with[0] == 1013
        await fast.wait_for(11)
        assert [f["offset"] for f in fast.sent[1:]] == list(range(1, 11))
        # encoded once: both sockets were handed the very same string
        assert fast.texts[1] is slow.texts[1]
        assert fast.closed_with is None
        fast.inbox_send.close()
    slow.close_streams()
    fast.close_streams()
    assert replay.stats()["connections"] == 0


async def test_live_events_held_during_a_stalled_replay_count_toward_the_queue() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=5, replay_page_size=2)
    ws = FakeWebSocket()
    async with replay, anyio.create_task_group() as tg:
        await replay.publish_many("t", [("x", i) for i in range(10)])
        tg.start_soon(serve_fake, replay, ws, "c")
        ws.stalled = True
        await ws.client_sends({"type": "subscribe", "topic": "t", "rewind": 10})
        # the `subscribed` reply is being written: the subscription is registered and replaying
        with anyio.fail_after(TIMEOUT):
            await ws.send_attempted.wait()
        assert replay.stats()["subscriptions"] == 1
        for i in range(6):
            await replay.publish("t", "x", i)
        with anyio.fail_after(TIMEOUT):
            await ws.closed.wait()
        assert ws.closed_with is not None and ws.closed_with[0] == 1013
    ws.close_streams()
    assert replay.stats() == {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}


# --- long replays ---------------------------------------------------------------------------------------


@pytest.mark.replay(store=MemoryStore(history_size=20_000), send_queue_size=4)
async def test_long_replay_is_paced_not_closed(app_for: tuple[Replay, Any]) -> None:
    replay, app = app_for
    for start in range(0, 20_000, 5_000):
        await replay.publish_many("t", [("x", start + i) for i in range(5_000)])
    async with connect(app) as c:
        sub = await c.subscribe("t", rewind=20_000)
        assert sub["replayed"] == 20_000
        expected = 1
        with anyio.fail_after(60):
            while expected <= 20_000:
                frame = await c.recv()
                assert (frame["type"], frame["offset"]) == ("event", expected)
                expected += 1
        await replay.publish("t", "x", "live")
        assert (await c.recv())["offset"] == 20_001


# --- the replay -> live hand-off ------------------------------------------------------------------------


class GatedStore(MemoryStore):
    """A MemoryStore whose position() and read() stop until the test has published more."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.armed = False
        self.pause_on = {"position", "read"}
        self.pauses_send, self.pauses = anyio.create_memory_object_stream[anyio.Event](100)

    async def aclose(self) -> None:
        self.pauses_send.close()
        self.pauses.close()
        await super().aclose()

    async def _pause(self, method: str) -> None:
        if self.armed and method in self.pause_on:
            resume = anyio.Event()
            await self.pauses_send.send(resume)
            await resume.wait()

    async def position(self, topic: str) -> Any:
        await self._pause("position")  # events published now are both before the head and offered live
        return await super().position(topic)

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        await self._pause("read")  # events published now are after the head: held back, then merged
        return await super().read(topic, after, limit)


async def test_hand_off_under_a_slow_store_delivers_every_event_once_in_order() -> None:
    store = GatedStore(history_size=100_000)
    replay = Replay(store, authorize=allow_all, replay_page_size=50, send_queue_size=10_000)
    async with running(make_app(replay)) as app, connect(app) as c:
        await replay.publish_many("t", [("x", i) for i in range(500)])
        store.armed = True
        published = 500

        async def publish_at_each_pause() -> None:
            nonlocal published
            async for resume in store.pauses:
                await replay.publish_many("t", [("x", published + i) for i in range(3)])
                published += 3
                resume.set()

        received: list[int] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_at_each_pause)
            sub = await c.subscribe("t", rewind=10**6)
            assert sub["replayed"] == 503  # 3 published while the head was being read
            received += [e["offset"] for e in await c.events(sub["replayed"])]
            store.armed = False
            tg.cancel_scope.cancel()
        for i in range(10):
            await replay.publish("t", "x", published + i)
        published += 10
        with anyio.fail_after(TIMEOUT):
            while len(received) < published:
                frame = await c.recv()
                assert frame["type"] == "event", frame
                received.append(frame["offset"])
        assert received == list(range(1, published + 1))
        await c.nothing_pending()


async def _read_all(c: Client, n: int) -> list[int]:
    return [e["offset"] for e in await c.events(n)]


async def test_epoch_change_under_a_live_subscriber_closes_1013() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c:
        await c.subscribe("t")
        await replay.publish("t", "x", 1)
        assert await _read_all(c, 1) == [1]
        # what a store that lost the topic's history would deliver next
        replay.hub.deliver(Event("t", "another-epoch", 1, "x", "1", 0))
        assert await c.closed() == 1013


async def test_gap_in_live_events_closes_1013_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c, connect(app) as other:
        sub = await c.subscribe("t")
        await other.subscribe("u")
        with caplog.at_level("WARNING", logger="starlette_replay.hub"):
            # a burst arriving after the hole: one warning, not one per event
            for offset in range(2, 200):
                replay.hub.deliver(Event("t", sub["epoch"], offset, "x", "1", 0))
        assert await c.closed() == 1013
        await other.nothing_pending()
    gaps = [r for r in caplog.records if "gap in live events" in r.getMessage()]
    assert len(gaps) == 1, [r.getMessage() for r in gaps[:3]]


async def test_store_reset_closes_the_topic_subscribers_1013() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c, connect(app) as other:
        await c.subscribe("t")
        await other.subscribe("u")
        replay.hub.reset("t", "lost contact")
        assert await c.closed() == 1013
        await other.nothing_pending()


@pytest.mark.parametrize("how", ["rewind", "cursor at the oldest", "cursor too old"])
async def test_replay_from_the_oldest_of_a_full_topic_survives_a_publish(how: str) -> None:
    """A busy topic at its history_size trims its oldest event on every publish. A
    subscription that starts from the oldest retained event must not close with 1013 (and
    so livelock: the client would come back to the same race) when that event goes
    between reading the head and reading the history."""
    store = GatedStore(history_size=10)
    replay = Replay(store, authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as c:
        first = await replay.publish_many("t", [("x", i) for i in range(12)])  # retains 3..12
        epoch = first[0].epoch
        fields: dict[str, Any] = {
            "rewind": {"rewind": 100},
            "cursor at the oldest": {"epoch": epoch, "offset": 2},
            "cursor too old": {"epoch": epoch, "offset": 1},
        }[how]
        store.armed = True
        store.pause_on = {"read"}
        await c.send({"type": "subscribe", "topic": "t", **fields})
        with anyio.fail_after(TIMEOUT):
            resume = await store.pauses.receive()
        await replay.publish("t", "x", "trims offset 3")
        store.armed = False
        resume.set()
        sub = await c.recv_type("subscribed")
        assert (sub["offset"], sub["replayed"], sub["recovered"]) == (12, 9, False)
        assert sub["resumed"] is (how != "rewind")
        assert [e["offset"] for e in await c.events(10)] == list(range(4, 14))
        await c.nothing_pending()
