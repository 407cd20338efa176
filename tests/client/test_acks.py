"""Acks are batched, processed cursors are persisted, and a restarted process resumes from them."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from starlette.websockets import WebSocket

from starlette_replay import Cursor, Event, MemoryStore, Replay, allow_all
from starlette_replay.client import Backoff, FileCursorStore, MemoryCursorStore, ReplayClient, Reset

from .helpers import TIMEOUT, replay_app, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


class CountingStore(MemoryStore):
    """A MemoryStore that records every cursor an ack stores (one call per ack frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.acks: list[tuple[str, str, Cursor]] = []
        self.changed = anyio.Event()

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        self.acks.append((identity, topic, cursor))
        self.changed.set()
        self.changed = anyio.Event()
        await super().save_cursor(identity, topic, cursor)

    async def acked(self, offset: int) -> None:
        with anyio.fail_after(TIMEOUT):
            while not self.acks or self.acks[-1][2].offset != offset:
                await self.changed.wait()


def user(websocket: WebSocket) -> str:
    return "u1"


async def test_acks_are_batched_not_one_per_event() -> None:
    store = CountingStore()
    replay = Replay(store, authorize=allow_all, identify=user)
    async with serve(replay_app(replay)) as port:
        async with ReplayClient(url(port), acks=True, ack_every=10, ack_interval=60, backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                await replay.publish_many("t", [("n", i) for i in range(35)])
                items = await take(client, 35)
        # Leaving the block flushed the last cursor.
        await store.acked(35)
    assert [i.offset for i in items if isinstance(i, Event)] == list(range(1, 36))
    offsets = [cursor.offset for _, _, cursor in store.acks]
    # The fresh start (0), about every 10 events, and the final one: not 35 acks.
    assert 2 <= len(offsets) <= 6, offsets
    assert offsets == sorted(set(offsets))
    assert {(identity, topic) for identity, topic, _ in store.acks} == {("u1", "t")}
    assert store.acks[-1][2] == Cursor(items[0].epoch, 35, items[34].time)  # the client sends the time it got


async def test_manual_ack_is_flushed_after_the_interval() -> None:
    store = CountingStore()
    replay = Replay(store, authorize=allow_all, identify=user)
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(url(port), acks=True, auto_ack=False, ack_interval=0.05, backoff=FAST) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            await replay.publish_many("t", [("n", i) for i in range(5)])
            items = await take(client, 5)
            await store.acked(0)  # the fresh start
            client.ack(items[2])
            await store.acked(3)  # flushed by the timer, the client still open
            assert client.cursor("t") == Cursor(items[2].epoch, 3, items[2].time)
    assert all(cursor.offset <= 3 for _, _, cursor in store.acks)


async def test_server_side_cursor_resumes_a_client_without_local_state() -> None:
    store = CountingStore()
    replay = Replay(store, authorize=allow_all, identify=user)
    async with serve(replay_app(replay)) as port:
        async with ReplayClient(url(port), acks=True, backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                await replay.publish_many("t", [("n", i) for i in range(8)])
                await take(client, 5)
        await store.acked(5)
        # A new process of the same identity, with no cursor of its own.
        async with ReplayClient(url(port), backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                items = await take(client, 3)
    assert [i.offset for i in items if isinstance(i, Event)] == [6, 7, 8]


async def test_cursor_file_lets_a_restarted_process_resume(tmp_path: Path) -> None:
    path = tmp_path / "cursors.json"
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port:
        await replay.publish_many("t", [("n", i) for i in range(8)])
        async with ReplayClient(url(port), cursor_store=FileCursorStore(path), rewind=8, backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                first = await take(client, 5)
        epoch = first[0].epoch if isinstance(first[0], Event) else ""
        # the time of the event at the cursor is kept, so the resume can tell a reused offset
        assert json.loads(path.read_text()) == {"t": [epoch, 5, first[4].time]}
        # "Restart": a new client and a new store object on the same file.
        async with ReplayClient(url(port), topics=["t"], cursor_store=FileCursorStore(path), backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                rest = await take(client, 3)
    assert [i.offset for i in first + rest if isinstance(i, Event)] == list(range(1, 9))


async def test_leaving_with_an_exception_does_not_count_the_last_item_as_processed() -> None:
    cursors = MemoryCursorStore()
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port:
        await replay.publish_many("t", [("n", i) for i in range(3)])
        with pytest.raises(RuntimeError, match="handler failed"):
            async with ReplayClient(url(port), topics=["t"], cursor_store=cursors, rewind=3, backoff=FAST) as client:
                await take(client, 3)
                raise RuntimeError("handler failed")
    assert cursors.cursors["t"].offset == 2


async def test_a_fresh_start_is_saved_so_a_restart_misses_nothing() -> None:
    cursors = MemoryCursorStore()
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port:
        await replay.publish_many("t", [("n", i) for i in range(4)])
        async with ReplayClient(url(port), cursor_store=cursors, backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")  # starts at the head: 4
        assert cursors.cursors["t"].offset == 4
        await replay.publish("t", "n", 4)  # published while the process is down
        async with ReplayClient(url(port), topics=["t"], cursor_store=cursors, backoff=FAST) as client:
            (item,) = await take(client, 1)
    assert isinstance(item, Event) and (item.offset, item.data) == (5, 4)


async def test_a_saved_cursor_from_a_lost_epoch_gives_a_reset() -> None:
    cursors = MemoryCursorStore({"t": Cursor("gone", 41)})
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port:
        await replay.publish("t", "n", 0)
        async with ReplayClient(url(port), topics=["t"], cursor_store=cursors, backoff=FAST) as client:
            reset, event = await take(client, 2)
    assert isinstance(reset, Reset) and reset.previous == Cursor("gone", 41)
    assert isinstance(event, Event) and (event.epoch, event.offset) == (reset.epoch, 1)
    assert cursors.cursors["t"] == Cursor(reset.epoch, 1, event.time)


async def test_unsubscribe_acks_where_the_app_stopped() -> None:
    store = CountingStore()
    replay = Replay(store, authorize=allow_all, identify=user)
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(url(port), acks=True, auto_ack=False, ack_interval=60, backoff=FAST) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            await replay.publish_many("t", [("n", i) for i in range(4)])
            items = await take(client, 4)
            client.ack(items[2])
            await client.unsubscribe("t")
            await store.acked(3)
    assert [c.offset for _, _, c in store.acks] == [0, 3]
