"""The EventStore contract (stores/base.py), run against every backend.

Add a backend by adding a branch to ``open_store`` and a value to ``BACKENDS``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from starlette_replay import Cursor, EventStore, MemoryStore, RedisStore
from tests.redis_cluster import LocalCluster, redis_cluster  # noqa: F401
from tests.redis_server import RecordingSink, RedisServer, attached, redis_server  # noqa: F401

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis), pytest.param("cluster", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    if request.param == "cluster":
        request.getfixturevalue("redis_cluster")
    return str(request.param)


@pytest.fixture
def open_store(backend: str, request: pytest.FixtureRequest) -> Any:
    @asynccontextmanager
    async def open_(**options: Any) -> AsyncIterator[tuple[EventStore, RecordingSink]]:
        store: EventStore
        if backend == "memory":
            store = MemoryStore(**options)
        elif backend == "cluster":  # a 3-primary, 3-replica Redis Cluster
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
            prefix = f"t{secrets.token_hex(4)}"
            store = RedisStore.from_url(cluster.url, cluster=True, prefix=prefix, publish_timeout=5, **options)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStore.from_url(server.url, prefix=f"t{secrets.token_hex(4)}", publish_timeout=5, **options)
        async with attached(store) as opened:
            yield opened

    return open_


async def test_the_backends_implement_the_protocol(open_store: Any) -> None:
    async with open_store() as (store, _):
        assert isinstance(store, EventStore)


async def test_offsets_are_dense_from_one_in_one_epoch(open_store: Any) -> None:
    async with open_store() as (store, _):
        events = [(await store.append("t", [("e", f'{{"i":{i}}}')]))[0] for i in range(5)]
        assert [e.offset for e in events] == [1, 2, 3, 4, 5]
        assert len({e.epoch for e in events}) == 1
        assert [e.data for e in events] == [{"i": i} for i in range(5)]
        assert all(e.topic == "t" and e.event == "e" and e.time > 1_600_000_000_000 for e in events)
        position = await store.position("t")
        assert (position.epoch, position.head, position.oldest) == (events[0].epoch, 5, 1)


async def test_append_many_is_consecutive_even_when_concurrent(open_store: Any) -> None:
    async with open_store() as (store, _):
        batches: list[list[Any]] = []

        async def publish(n: int) -> None:
            batches.append(await store.append("t", [("e", str(k)) for k in range(n)]))

        async with anyio.create_task_group() as tg:
            for n in (3, 1, 4, 2, 5):
                tg.start_soon(publish, n)
        for batch in batches:
            offsets = [e.offset for e in batch]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        assert sorted(e.offset for batch in batches for e in batch) == list(range(1, 16))
        stored = await store.read("t", 0, 100)
        assert stored == sorted((e for batch in batches for e in batch), key=lambda e: e.offset)


async def test_empty_append_stores_nothing(open_store: Any) -> None:
    async with open_store() as (store, _):
        assert await store.append("t", []) == []
        assert (await store.position("t")).head == 0


async def test_idempotency_key_returns_the_original_events(open_store: Any) -> None:
    async with open_store() as (store, _):
        first = await store.append("t", [("a", "1"), ("b", "2")], idempotency_key="k1")
        await store.append("t", [("c", "3")])
        again = await store.append("t", [("x", "99")], idempotency_key="k1")
        assert again == first
        assert [e.offset for e in again] == [1, 2]
        assert (await store.position("t")).head == 3
        # keys are per topic
        other = await store.append("u", [("a", "1")], idempotency_key="k1")
        assert other[0].offset == 1 and other[0].topic == "u"


async def test_read_is_paged_after_an_offset(open_store: Any) -> None:
    async with open_store() as (store, _):
        published = await store.append("t", [("e", str(i)) for i in range(10)])
        page = await store.read("t", 3, 4)
        assert [e.offset for e in page] == [4, 5, 6, 7]
        assert page == published[3:7]
        assert await store.read("t", 10, 5) == []
        assert await store.read("t", 0, 100) == published
        assert await store.read("t", 0, 0) == []
        assert await store.read("never-published", 0, 10) == []


async def test_position_of_a_new_topic_makes_its_epoch(open_store: Any) -> None:
    async with open_store() as (store, _):
        position = await store.position("fresh")
        assert position.head == 0 and position.oldest == 1 and position.epoch
        assert await store.position("fresh") == position
        (event,) = await store.append("fresh", [("e", "1")])
        assert event.epoch == position.epoch and event.offset == 1
        assert (await store.position("other")).epoch != position.epoch


async def test_subscribe_then_append_delivers_in_order(open_store: Any) -> None:
    async with open_store() as (store, sink):
        await store.subscribe("t")
        published = await store.append("t", [("e", "1")])
        published += await store.append("t", [("e", "2"), ("e", "3"), ("e", "4")])
        published += await store.append("t", [("e:x.y", '{"text": "caf\u00e9 \u2603 \U0001f600 | 3:abc"}')])
        await store.append("not-subscribed", [("e", "x")])
        await sink.wait_for(lambda: len(sink.of("t")) >= 5)
        assert sink.of("t") == published
        assert [e.offset for e in sink.of("t")] == [1, 2, 3, 4, 5]
        assert sink.of("not-subscribed") == []
        assert sink.resets == []


async def test_subscribe_is_confirmed_before_it_returns(open_store: Any) -> None:
    # nothing appended after subscribe() returned may be missed, even immediately
    async with open_store() as (store, sink):
        for i in range(5):
            topic = f"t{i}"
            await store.subscribe(topic)
            (event,) = await store.append(topic, [("e", "1")])
            await sink.wait_for(lambda topic=topic: len(sink.of(topic)) == 1)
            assert sink.of(topic) == [event]


async def test_unsubscribe_stops_delivery(open_store: Any) -> None:
    async with open_store() as (store, sink):
        await store.subscribe("t")
        await store.append("t", [("e", "1")])
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        await store.unsubscribe("t")
        await store.append("t", [("e", "2")])
        # a marker on another topic, published after: once it is in, "t" had its chance
        await store.subscribe("marker")
        await store.append("marker", [("e", "m")])
        await sink.wait_for(lambda: len(sink.of("marker")) == 1)
        assert [e.offset for e in sink.of("t")] == [1]
        await store.unsubscribe("never-subscribed")  # never raises


async def test_cursors_move_forward_within_an_epoch_and_another_epoch_replaces(open_store: Any) -> None:
    async with open_store() as (store, _):
        assert await store.load_cursor("alice", "t") is None
        await store.save_cursor("alice", "t", Cursor("e1", 5))
        await store.save_cursor("alice", "t", Cursor("e1", 3))
        assert await store.load_cursor("alice", "t") == Cursor("e1", 5)
        await store.save_cursor("alice", "t", Cursor("e1", 7))
        assert await store.load_cursor("alice", "t") == Cursor("e1", 7)
        await store.save_cursor("alice", "t", Cursor("e2", 2))
        assert await store.load_cursor("alice", "t") == Cursor("e2", 2)
        assert await store.load_cursor("bob", "t") is None
        assert await store.load_cursor("alice", "u") is None


async def test_a_cursor_keeps_the_time_of_its_event(open_store: Any) -> None:
    # protocol.md, "Reused offsets": the stored cursor carries the acked event's time
    async with open_store() as (store, _):
        await store.save_cursor("alice", "t", Cursor("e1", 5, 1_700_000_000_005))
        assert await store.load_cursor("alice", "t") == Cursor("e1", 5, 1_700_000_000_005)
        await store.save_cursor("alice", "t", Cursor("e1", 6))  # forward, its time unknown
        assert await store.load_cursor("alice", "t") == Cursor("e1", 6, None)
        await store.save_cursor("alice", "t", Cursor("e2", 1, 7))
        assert await store.load_cursor("alice", "t") == Cursor("e2", 1, 7)


async def test_history_size_trims_and_moves_oldest(open_store: Any) -> None:
    async with open_store(history_size=5) as (store, _):
        published = await store.append("t", [("e", str(i)) for i in range(3)])
        published += await store.append("t", [("e", str(i)) for i in range(3, 8)])
        position = await store.position("t")
        assert (position.head, position.oldest) == (8, 4)
        assert await store.read("t", 0, 100) == published[3:]
        assert await store.read("t", 5, 100) == published[5:]


async def test_history_ttl_expiry_yields_a_new_epoch(open_store: Any) -> None:
    async with open_store(history_ttl=0.2) as (store, _):
        (event,) = await store.append("t", [("e", "1")])
        # The TTL is what is under test: let it pass (both stores expire on access).
        await anyio.sleep(0.3)
        position = await store.position("t")
        assert position.epoch != event.epoch
        assert position.head == 0 and position.oldest == 1
        assert await store.read("t", 0, 10) == []
        (after,) = await store.append("t", [("e", "2")])
        assert after.offset == 1 and after.epoch == position.epoch
