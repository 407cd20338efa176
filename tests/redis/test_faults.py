"""RedisStore under faults: a real redis-server, flushed, killed, restarted, cut off.

The invariant every test checks: what a sink received for a topic is exactly
what publishers were told is stored, in offset order, no hole, no duplicate; or,
where Redis really lost history, a ``reset`` and a new epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import anyio
import anyio.to_thread
import pytest

from starlette_replay import Event, RedisStore, StoreUnavailable
from tests.redis_server import RecordingSink, RedisServer
from tests.redis_server import connected as connected_store

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


# the listener pings every second here, so a dead pub/sub link is noticed fast
connected = partial(connected_store, health_check_interval=1)


async def publish_until_stored(store: RedisStore, topic: str, key: str, data: str) -> Event:
    """What a careful publisher does: retry with the same idempotency key until Redis confirms."""
    with anyio.fail_after(30):
        while True:
            try:
                (event,) = await store.append(topic, [("e", data)], idempotency_key=key)
                return event
            except StoreUnavailable:
                await anyio.sleep(0.05)  # a real publisher's retry pause, not synchronisation


def assert_exact(received: list[Event], published: list[Event]) -> None:
    assert [e.offset for e in received] == [e.offset for e in published]
    assert received == published


async def test_flushall_gives_a_new_epoch_and_resets_live_topics(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    async with connected(server.url) as (store, sink):
        await store.subscribe("t")
        before = await store.append("t", [("e", "1"), ("e", "2")])
        await sink.wait_for(lambda: len(sink.of("t")) == 2)
        await anyio.to_thread.run_sync(server.flushall)
        position = await store.position("t")
        assert position.epoch != before[0].epoch
        assert (position.head, position.oldest) == (0, 1)
        (after,) = await store.append("t", [("e", "3")])
        assert (after.epoch, after.offset) == (position.epoch, 1)
        await sink.wait_for(lambda: len(sink.of("t")) == 3)
        assert sink.of("t")[2] == after
        assert [topic for topic, _ in sink.resets] == ["t"]


async def test_a_topic_whose_meta_key_vanished_starts_a_new_epoch_cleanly(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    # eviction can drop one key of a topic and keep another: the stale stream must not leak
    server = redis_server_factory()
    async with connected(server.url, prefix="p") as (store, _):
        old = await store.append("t", [("e", "1"), ("e", "2")])
        with server.client() as client:
            assert client.delete("p:{t}:meta") == 1
        (new,) = await store.append("t", [("e", "3")])
        assert new.offset == 1 and new.epoch != old[0].epoch
        assert await store.read("t", 0, 10) == [new]


async def test_restart_mid_stream_loses_nothing(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(appendonly=True)
    published: list[Event] = []
    restarted = anyio.Event()
    async with connected(server.url) as (store, sink):
        await store.subscribe("t")

        async def publisher() -> None:
            i = after = 0
            while after < 100:  # publishing through the restart, then 100 more
                published.append(await publish_until_stored(store, "t", f"k{i}", str(i)))
                i += 1
                after += restarted.is_set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            await sink.wait_for(lambda: len(sink.of("t")) >= 50)
            await anyio.to_thread.run_sync(server.restart)
            restarted.set()
        total = len(published)
        await sink.wait_for(lambda: len(sink.of("t")) >= total, timeout=30)
        assert [e.offset for e in published] == list(range(1, total + 1))
        assert_exact(sink.of("t"), published)
        assert sink.resets == []
        assert store.reconnects >= 2
        # publishes during the restart waited for Redis (within publish_timeout) or were retried


async def test_client_kill_of_the_listener_under_publishing_loses_nothing(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    topics = ["a", "b", "c"]
    total = 20_000  # a bound; the publisher stops once the kills are done
    published: list[Event] = []
    kills = 0
    async with connected(server.url) as (store, sink):
        for topic in topics:
            await store.subscribe(topic)

        stop = anyio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set() and i < total:
                published.append((await store.append(topics[i % 3], [("e", str(i))]))[0])
                i += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            seen = 0
            for round_ in range(1, 9):
                # killed only once it is back: reconnected, and delivering again (so subscribed)
                await sink.wait_for(
                    lambda round_=round_, seen=seen: store.reconnects >= round_ and len(sink.events) >= seen + 30,
                    timeout=20,
                )
                seen = len(sink.events)
                kills += await anyio.to_thread.run_sync(server.kill_pubsub_clients)
            stop.set()
        await sink.wait_for(lambda: len(sink.events) >= len(published), timeout=30)
        for topic in topics:
            assert_exact(sink.of(topic), [e for e in published if e.topic == topic])
        assert sink.resets == []
        assert kills == 8
        assert store.reconnects >= kills  # the first connection, then one per kill but maybe the last


async def test_publish_raises_store_unavailable_within_publish_timeout_then_recovers(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=True)
    async with connected(server.url, publish_timeout=0.5) as (store, sink):
        await store.subscribe("t")
        (first,) = await store.append("t", [("e", "before")])
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        await anyio.to_thread.run_sync(server.kill)

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.append("t", [("e", "while down")], idempotency_key="down")
        assert time.monotonic() - started < 0.5 + 1.5
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.append("t", [("e", "no key")])
        assert time.monotonic() - started < 0.5 + 1.5
        with pytest.raises(StoreUnavailable):
            await store.subscribe("other")
        with pytest.raises(StoreUnavailable):
            await store.position("t")

        await anyio.to_thread.run_sync(server.start)
        later = [await publish_until_stored(store, "t", f"after{i}", str(i)) for i in range(5)]
        await sink.wait_for(lambda: len(sink.of("t")) >= 6)
        assert_exact(sink.of("t"), [first, *later])
        assert later[0].epoch == first.epoch  # AOF kept the topic
        assert sink.resets == []
        # the subscription that failed was not left behind
        with server.client() as client:
            assert client.pubsub_channels("*:live") == [b"replay:{t}:live"]  # the store's probe channel aside


async def test_events_missed_and_trimmed_while_disconnected_reset_the_topic(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    async with connected(server.url, prefix="p", history_size=5) as (store, sink):
        await store.subscribe("t")
        (first,) = await store.append("t", [("e", "0")])
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        # Lock the listener out (it cannot reconnect without the password), publish
        # past history_size through an authenticated store, then let it back in.
        with server.client() as admin:
            admin.config_set("requirepass", "sesame")
            admin.execute_command("AUTH", "sesame")
            admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            other = RedisStore.from_url(server.url.replace("//", "//:sesame@"), prefix="p", history_size=5)
            try:
                missed = await other.append("t", [("e", str(i)) for i in range(1, 21)])
            finally:
                await other.aclose()
            assert (await other_position(server, "sesame")) == (first.epoch, 21, 17)
            admin.config_set("requirepass", "")
        await sink.wait_for(lambda: len(sink.resets) == 1, timeout=20)
        assert sink.resets[0][0] == "t"
        assert [e.offset for e in missed] == list(range(2, 22))
        # the topic goes on live from where Redis stands
        (later,) = await store.append("t", [("e", "later")])
        await sink.wait_for(lambda: sink.of("t")[-1].offset == 22)
        assert sink.of("t") == [first, later]
        # and what a client with an old cursor can still get is what is retained
        position = await store.position("t")
        assert (position.head, position.oldest) == (22, 18)
        assert [e.offset for e in await store.read("t", 1, 100)] == list(range(18, 23))


async def other_position(server: RedisServer, password: str) -> tuple[str, int, int]:
    store = RedisStore.from_url(server.url.replace("//", f"//:{password}@"), prefix="p")
    try:
        position = await store.position("t")
    finally:
        await store.aclose()
    return position.epoch, position.head, position.oldest


async def five_delivered_and_a_replica_of_three(
    server: RedisServer, store: RedisStore, sink: RecordingSink
) -> tuple[list[Event], dict[str, bytes]]:
    """Topic "t" (prefix "p") subscribed and delivered up to offset 5; the dump of its
    keys taken at offset 3: what a replica that missed the last two writes holds."""
    await store.subscribe("t")
    published = await store.append("t", [("e", str(i)) for i in range(3)])
    with server.client() as client:
        replica = {key: client.dump(key) for key in ("p:{t}:meta", "p:{t}:log")}
    published += await store.append("t", [("e", str(i)) for i in range(3, 5)])
    await sink.wait_for(lambda: len(sink.of("t")) == 5)
    return published, replica


async def test_a_head_that_moved_back_is_reported_as_lost_events(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    # What a failover to a lagging replica looks like: same epoch, the last writes gone.
    server = redis_server_factory()
    async with connected(server.url, prefix="p") as (store, sink):
        published, replica = await five_delivered_and_a_replica_of_three(server, store, sink)
        with server.client() as client:  # the failover: the replica's keys come back
            for key, value in replica.items():
                client.restore(key, 0, value, replace=True)
            assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await sink.wait_for(lambda: len(sink.resets) == 1)
        assert sink.resets[0][0] == "t" and "head moved back" in sink.resets[0][1]
        (reused,) = await store.append("t", [("e", "new")])
        assert (reused.epoch, reused.offset) == (published[0].epoch, 4)
        await sink.wait_for(lambda: len(sink.of("t")) == 6)
        assert sink.of("t")[-1] == reused


async def test_reused_offsets_past_the_old_head_are_reported_after_a_reconnect(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    # The failover of the test above, after which publishes carried the head past
    # where it was before the listener came back: the head alone looks fine (6 > 5),
    # but offsets 4 and 5 now hold other events. The event at the last offset
    # delivered, compared by its time, tells.
    server = redis_server_factory()
    async with connected(server.url, prefix="p") as (store, sink):
        published, replica = await five_delivered_and_a_replica_of_three(server, store, sink)
        with server.client() as client:  # the failover, then three publishes nobody here heard live
            for key, value in replica.items():
                client.restore(key, 0, value, replace=True)
            stamp = str(published[-1].time + 1000)
            for offset in (4, 5, 6):
                client.xadd("p:{t}:log", {"t": "e", "d": f'"new{offset}"', "ms": stamp}, id=f"{offset}-0")
            client.hset("p:{t}:meta", "head", 6)
            assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await sink.wait_for(lambda: len(sink.resets) == 1)
        assert sink.resets[0][0] == "t" and "reused their offsets" in sink.resets[0][1]
        assert len(sink.of("t")) == 5  # nothing of the new history was passed off as a continuation
        (after,) = await store.append("t", [("e", "after")])
        assert (after.epoch, after.offset) == (published[0].epoch, 7)
        await sink.wait_for(lambda: len(sink.of("t")) == 6)
        assert sink.of("t")[-1] == after


async def test_a_restart_that_lost_the_data_resets_live_topics_and_starts_a_new_epoch(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=False)
    async with connected(server.url) as (store, sink):
        await store.subscribe("t")
        before = await store.append("t", [("e", "1"), ("e", "2")])
        await sink.wait_for(lambda: len(sink.of("t")) == 2)
        await anyio.to_thread.run_sync(server.restart)  # nothing persisted: the topic is gone
        await sink.wait_for(lambda: len(sink.resets) == 1, timeout=20)
        assert sink.resets[0][0] == "t"
        (after,) = await store.append("t", [("e", "3")])
        assert after.epoch != before[0].epoch and after.offset == 1
        await sink.wait_for(lambda: len(sink.of("t")) == 3)
        assert sink.of("t")[2] == after
