"""What a connection does when its store fails: error frames, 1013, 1011; stats stay clean."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from starlette_replay import Cursor, Event, MemoryStore, Position, Replay, StoreUnavailable, allow_all

from .helpers import connect, make_app, running

pytestmark = pytest.mark.anyio

ZERO = {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}


class FlakyStore(MemoryStore):
    """A MemoryStore whose named methods raise ``failure`` while listed in ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        self.failure: Exception = StoreUnavailable("redis is down")
        self.reads_before_failing = 0

    def _maybe_fail(self, name: str) -> None:
        if name in self.failing:
            raise self.failure

    async def subscribe(self, topic: str) -> None:
        self._maybe_fail("subscribe")
        await super().subscribe(topic)

    async def position(self, topic: str) -> Position:
        self._maybe_fail("position")
        return await super().position(topic)

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        if self.reads_before_failing > 0:
            self.reads_before_failing -= 1
        else:
            self._maybe_fail("read")
        return await super().read(topic, after, limit)

    async def load_cursor(self, identity: str, topic: str) -> Cursor | None:
        self._maybe_fail("load_cursor")
        return await super().load_cursor(identity, topic)

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        self._maybe_fail("save_cursor")
        await super().save_cursor(identity, topic, cursor)


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyStore, Replay, Any]]:
    store = FlakyStore()
    replay = Replay(store, authorize=allow_all, identify=lambda ws: "alice")
    async with running(make_app(replay)) as app:
        yield store, replay, app


@pytest.mark.parametrize("method", ["subscribe", "position", "load_cursor", "read"])
async def test_subscribe_when_the_store_is_unavailable(flaky: tuple[FlakyStore, Replay, Any], method: str) -> None:
    store, replay, app = flaky
    async with connect(app) as c:
        store.failing = {method}
        await replay.publish("t", "x", 0)
        error = await c.request({"type": "subscribe", "topic": "t", "rewind": 1, "ref": "r"})
        assert (error["type"], error["code"], error["topic"], error["ref"]) == ("error", "unavailable", "t", "r")
        stats = replay.stats()
        assert (stats["subscriptions"], stats["topics"]) == (0, 0)
        store.failing = set()
        await c.subscribe("t")
        await replay.publish("t", "x", 1)
        assert [e["offset"] for e in await c.events(1)] == [2]


async def test_store_lost_during_replay_closes_1013(flaky: tuple[FlakyStore, Replay, Any]) -> None:
    store, replay, app = flaky
    replay.limits = replace(replay.limits, replay_page_size=2)
    await replay.publish_many("t", [("x", i) for i in range(5)])
    async with connect(app) as c:
        store.failing = {"read"}
        store.reads_before_failing = 1  # the first page is read before `subscribed`
        # frames queued before the close (the `subscribed` reply) may or may not get out
        await c.send({"type": "subscribe", "topic": "t", "rewind": 5})
        assert await c.closed() == 1013
    assert replay.stats() == ZERO


async def test_unexpected_store_error_closes_1011(flaky: tuple[FlakyStore, Replay, Any]) -> None:
    store, replay, app = flaky
    await replay.publish("t", "x", 1)
    async with connect(app) as c, connect(app) as other:
        await other.subscribe("t")
        store.failure = KeyError("bug in a store")
        store.failing = {"position"}
        await c.send({"type": "subscribe", "topic": "t", "rewind": 1})
        assert await c.closed() == 1011
        store.failing = set()
        # another connection is not affected
        await replay.publish("t", "x", 2)
        assert [e["offset"] for e in await other.events(1)] == [2]
    assert replay.stats() == ZERO


async def test_ack_when_the_store_is_unavailable(flaky: tuple[FlakyStore, Replay, Any]) -> None:
    store, _, app = flaky
    async with connect(app) as c:
        sub = await c.subscribe("t")
        store.failing = {"save_cursor"}
        error = await c.request({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": 0, "ref": 4})
        assert (error["code"], error["topic"], error["ref"]) == ("unavailable", "t", 4)
        store.failing = set()
        await c.send({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": 0})
        await c.nothing_pending()
    assert await store.load_cursor("alice", "t") == Cursor(sub["epoch"], 0)
