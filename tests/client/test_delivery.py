"""Exactly once, in order, across forced disconnects and server restarts (real uvicorn, real sockets)."""

from __future__ import annotations

import anyio
import pytest

from starlette_replay import CloseCode, Event, MemoryStore, Replay, allow_all
from starlette_replay.client import Backoff, ReplayClient, Reset

from .helpers import TIMEOUT, abort_all, free_port, replay_app, serve, take, tcp_proxy, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


async def test_live_events_carry_every_field() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("user:42")
            published = await replay.publish("user:42", "task_interaction", {"text": "héllo", "n": [1, 2.5]})
            (event,) = await take(client, 1)
        assert isinstance(event, Event)
        assert (event.topic, event.epoch, event.offset) == ("user:42", published.epoch, 1)
        assert event.event == "task_interaction"
        assert event.data == {"text": "héllo", "n": [1, 2.5]}
        assert event.time == published.time
        assert event == published  # same raw JSON text, too


@pytest.mark.parametrize(
    "code", [CloseCode.SERVICE_RESTART, CloseCode.TRY_AGAIN_LATER, CloseCode.INTERNAL_ERROR, CloseCode.GOING_AWAY]
)
async def test_exactly_once_across_server_side_closes(code: CloseCode) -> None:
    subscribing = anyio.Event()

    def authorize(websocket: object, topic: str) -> bool:
        subscribing.set()  # a (re)subscribe is being handled: the connection exists
        return True

    replay = Replay(MemoryStore(), authorize=authorize)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            received: list[Event] = []
            for batch in range(5):
                await subscribing.wait()
                subscribing = anyio.Event()
                for i in range(20):
                    await replay.publish("t", "n", batch * 20 + i)
                # Live frames still queued on the server are lost with the socket: replay must bring them back.
                assert abort_all(replay, code) == 1
                for item in await take(client, 20):
                    assert isinstance(item, Event)
                    received.append(item)
        assert [e.offset for e in received] == list(range(1, 101))
        assert [e.data for e in received] == list(range(100))
        assert client.connections >= 5  # one per batch: each abort hit a live connection


async def test_exactly_once_across_tcp_cuts_while_publishing() -> None:
    """1006 (no close frame) in the middle of a stream, several times, with a publisher racing."""
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port, tcp_proxy(port) as proxy:
        async with ReplayClient(url(proxy.port), topics=["a", "b"], backoff=FAST) as client:
            total = 150
            seen: dict[str, list[int]] = {"a": [], "b": []}

            async def publish() -> None:
                for i in range(total):
                    await replay.publish("a", "n", i)
                    await replay.publish("b", "n", i)
                    if i % 30 == 15:
                        proxy.cut()
                    await anyio.lowlevel.checkpoint()

            with anyio.fail_after(TIMEOUT):
                await client.subscribe("a")
                await client.subscribe("b")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish)
                    async for item in client:
                        assert isinstance(item, Event)
                        seen[item.topic].append(item.offset)
                        assert item.data == item.offset - 1
                        if len(seen["a"]) == len(seen["b"]) == total:
                            break
        assert seen["a"] == seen["b"] == list(range(1, total + 1))
        assert proxy.accepted >= 2


async def test_server_restart_with_persistent_store_loses_nothing() -> None:
    """uvicorn restarts on the same port (1012) while the store lives on: no reset, no gap."""
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = replay_app(replay, lifespan=False)
    port = free_port()
    async with replay, ReplayClient(url(port), backoff=FAST) as client:
        async with serve(app, port):
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                await replay.publish("t", "n", 1)
                items = await take(client, 1)
        # uvicorn is down (it closed the socket with 1012); the client retries. Publish meanwhile.
        for i in range(2, 6):
            await replay.publish("t", "n", i)
        async with serve(app, port):
            with anyio.fail_after(TIMEOUT):
                items += await take(client, 4)
                await replay.publish("t", "n", 6)
                items += await take(client, 1)
    assert all(isinstance(i, Event) for i in items)
    assert [i.offset for i in items if isinstance(i, Event)] == [1, 2, 3, 4, 5, 6]
    assert client.connections == 2


async def test_server_restart_with_memory_store_yields_reset() -> None:
    """A new MemoryStore means a new epoch: the app gets a Reset, then the new epoch's events."""
    port = free_port()
    async with ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        old = Replay(MemoryStore(), authorize=allow_all)
        async with old, serve(replay_app(old, lifespan=False), port):
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                for i in range(3):
                    await old.publish("t", "n", i)
                before = await take(client, 3)
        new = Replay(MemoryStore(), authorize=allow_all)
        async with new:
            for i in range(2):
                await new.publish("t", "m", i)
            async with serve(replay_app(new, lifespan=False), port):
                with anyio.fail_after(TIMEOUT):
                    reset, *after = await take(client, 3)
                    await new.publish("t", "m", 2)
                    after += await take(client, 1)
    old_epoch = before[0].epoch if isinstance(before[0], Event) else None
    assert isinstance(reset, Reset)
    assert reset.previous is not None and reset.previous.epoch == old_epoch and reset.previous.offset == 3
    assert reset.epoch != old_epoch
    assert (reset.offset, reset.replayed) == (0, 2)
    assert [(e.epoch, e.offset, e.data) for e in after if isinstance(e, Event)] == [
        (reset.epoch, 1, 0),
        (reset.epoch, 2, 1),
        (reset.epoch, 3, 2),
    ]
