"""RedisStore on a Redis Cluster whose topology changes: migrations, fail-overs, a killed primary.

Each test starts a fresh 3-primary, 3-replica cluster (tests/redis_cluster.py,
``cluster-node-timeout`` 1 s) and checks the store's invariant: what the sink
received for a topic is exactly what Redis holds for it, in offset order, no
hole, no duplicate; or, where the cluster really lost acknowledged events, a
reset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from httpx_ws import WebSocketDisconnect

from starlette_replay import Event, RedisStore, Replay, StoreUnavailable, allow_all
from tests.helpers import connect, make_app, running
from tests.redis.test_faults import publish_until_stored
from tests.redis_cluster import ClusterNode, LocalCluster, topic_slot, wait_until
from tests.redis_server import RecordingSink, attached

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

logger = logging.getLogger(__name__)

PREFIX = "cf"


def cluster_store(cluster: LocalCluster, **options: Any) -> RedisStore:
    options.setdefault("publish_timeout", 3)
    options.setdefault("health_check_interval", 1)
    return RedisStore.from_url(cluster.url, cluster=True, prefix=PREFIX, **options)


def topics_on(cluster: LocalCluster, node: ClusterNode, count: int, *, slots: set[int] | None = None) -> list[str]:
    """``count`` topic names whose slots ``node`` holds (among ``slots``, when given)."""
    held = set(cluster.slots_of(node)) if slots is None else slots
    found = []
    i = 0
    while len(found) < count:
        topic = f"topic:{i}"
        if topic_slot(topic) in held:
            found.append(topic)
        i += 1
    return found


def errors_seen(node: ClusterNode, prefix: str) -> int:
    return int(node.info("errorstats").get(f"errorstat_{prefix}", {}).get("count", 0))


def listener_of(store: RedisStore, topic: str) -> tuple[str, int]:
    """The primary whose pub/sub connection carries ``topic`` for this store."""
    nodes = store._listener._nodes  # type: ignore[union-attr]
    return next(address for address, listener in nodes.items() if topic in listener.topics)


async def stored(store: RedisStore, topic: str) -> list[Event]:
    return await store.read(topic, 0, 100_000)


async def test_a_slot_migrated_by_hand_goes_through_tryagain_ask_and_moved_and_live_events_follow(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    source, target = cluster.primaries()[:2]
    (topic,) = topics_on(cluster, source, 1)
    slot = topic_slot(topic)
    base = f"{PREFIX}:{{{topic}}}:"
    meta, log, idem, idemz = base + "meta", base + "log", base + "idem", base + "idemz"
    async with attached(cluster_store(cluster, publish_timeout=15)) as (store, sink):
        await store.subscribe(topic)
        # keyed: the idempotency keys exist, so the script's four keys can all be moved
        # (a script with a key missing gets TRYAGAIN until the migration ends, even on the target)
        published = await store.append(topic, [("e", "1"), ("e", "2")], idempotency_key="first")
        await sink.wait_for(lambda: len(sink.of(topic)) == 2)

        # The migration's first steps, by hand: the slot MIGRATING on the source, IMPORTING
        # on the target, and only the meta key moved. The append script now finds one
        # of its keys on the source and not the other: TRYAGAIN.
        target.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id())
        source.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id())
        source.execute("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", meta)
        tryagain, ask = errors_seen(source, "TRYAGAIN"), errors_seen(source, "ASK")
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def append() -> None:
                published.extend(await store.append(topic, [("e", "3")]))
                done.set()

            tg.start_soon(append)
            await anyio.to_thread.run_sync(
                wait_until, lambda: errors_seen(source, "TRYAGAIN") > tryagain, 10, "TRYAGAIN answered"
            )
            assert not done.is_set()
            # the rest of the keys: none on the source now, so it answers ASK, and the
            # store sends ASKING and the script to the target
            source.execute("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", log, idem, idemz)
        assert errors_seen(source, "ASK") > ask
        assert [e.offset for e in published] == [1, 2, 3]
        assert target.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 4  # it ran there
        assert source.execute("CLUSTER", "COUNTKEYSINSLOT", slot) == 0

        # The end of the migration: the target owns the slot. The source drops the
        # listener's subscription by itself; the listener follows the slot to the target
        # and repairs event 3 (published there while the source still carried the topic).
        for node in (target, source, *(n for n in cluster.primaries() if n not in (source, target))):
            node.execute("CLUSTER", "SETSLOT", slot, "NODE", target.node_id())
        await sink.wait_for(lambda: len(sink.of(topic)) == 3)
        assert listener_of(store, topic) == ("127.0.0.1", target.port)
        published += await store.append(topic, [("e", "4")])  # MOVED, or the refreshed map
        await sink.wait_for(lambda: len(sink.of(topic)) == 4)
        assert sink.of(topic) == published == await stored(store, topic)
        assert [e.offset for e in published] == [1, 2, 3, 4]
        assert sink.resets == []


async def publish_loop(
    store: RedisStore,
    topics: list[str],
    published: dict[str, list[Event]],
    fault_done: anyio.Event,
    after: int,
    *,
    keyed: bool,
    durations: list[float] | None,
    failures: list[BaseException] | None,
) -> None:
    """Publish round-robin over ``topics`` until ``after`` attempts were made after the fault:
    keyed appends retried until stored, or (``keyed=False``) one attempt each, timed,
    failures kept."""
    i = after_fault = 0
    while after_fault < after:
        topic = topics[i % len(topics)]
        if keyed:
            published[topic].append(await publish_until_stored(store, topic, f"k{i}", str(i)))
        else:
            started = time.monotonic()
            try:
                published[topic].extend(await store.append(topic, [("e", str(i))]))
            except StoreUnavailable as exc:
                assert failures is not None
                failures.append(exc)
            finally:
                if durations is not None:
                    durations.append(time.monotonic() - started)
        i += 1
        after_fault += fault_done.is_set()
        await anyio.sleep(0.002)  # pacing the feed, not synchronising


async def publishing_through(
    store: RedisStore,
    sink: RecordingSink,
    topics: list[str],
    fault: Callable[[], None],
    *,
    keyed: bool = True,
    after: int = 100,
    durations: list[float] | None = None,
    failures: list[BaseException] | None = None,
) -> dict[str, list[Event]]:
    """Subscribe ``topics``, publish over them, run ``fault`` (in a thread) once some were
    delivered, and go on for ``after`` more publishes. Returns what publishers were told
    is stored."""
    for topic in topics:
        await store.subscribe(topic)
    published: dict[str, list[Event]] = {topic: [] for topic in topics}
    fault_done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: publish_loop(
                store,
                topics,
                published,
                fault_done,
                after,
                keyed=keyed,
                durations=durations,
                failures=failures,
            )
        )
        await sink.wait_for(lambda: len(sink.events) >= 5 * len(topics), timeout=20)
        await anyio.to_thread.run_sync(fault)
        fault_done.set()
    return published


async def delivered_as_stored(store: RedisStore, sink: RecordingSink, topics: list[str]) -> dict[str, list[Event]]:
    """Wait until the sink has, for every topic, what Redis holds for it now, and return that."""
    history = {topic: await stored(store, topic) for topic in topics}
    await sink.wait_for(
        lambda: all(sink.of(t)[-1:] == history[t][-1:] or any(r[0] == t for r in sink.resets) for t in topics),
        timeout=30,
    )
    return history


async def test_cluster_failover_while_publishing_and_subscribed_loses_nothing(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    old = cluster.primaries()[0]
    replica = cluster.replica_of(old)
    topics = [f"fo:{i}" for i in range(24)]
    moved = [t for t in topics if topic_slot(t) in set(cluster.slots_of(old))]
    assert moved
    async with attached(cluster_store(cluster, publish_timeout=5)) as (store, sink):
        published = await publishing_through(store, sink, topics, lambda: cluster.failover(replica))
        history = await delivered_as_stored(store, sink, topics)
        for topic in topics:
            assert published[topic] == history[topic], topic  # a clean fail-over loses nothing
            assert sink.of(topic) == history[topic], topic
        assert sink.resets == []
        for topic in moved:
            assert listener_of(store, topic) == ("127.0.0.1", replica.port)


async def test_a_primary_killed_while_publishing_publishes_fail_in_time_or_succeed_and_nothing_stored_is_missed(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    victim = cluster.primaries()[1]
    replica = cluster.replica_of(victim)
    topics = [f"kill:{i}" for i in range(24)]
    on_victim = [t for t in topics if topic_slot(t) in set(cluster.slots_of(victim))]
    assert on_victim
    durations: list[float] = []
    failures: list[BaseException] = []

    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.time() * 1000)
        victim.kill()
        wait_until(lambda: replica.info("replication")["role"] == "master", 30, "the replica promoted")

    # publish_timeout 1 s: shorter than a fail-over (node timeout 1 s, then the election)
    async with attached(cluster_store(cluster, publish_timeout=1)) as (store, sink):
        published = await publishing_through(
            store, sink, topics, kill, keyed=False, durations=durations, failures=failures
        )
        history = await delivered_as_stored(store, sink, topics)
        # never hung: each publish returned or raised within publish_timeout (and a sweep)
        assert max(durations) < 1 + 0.5, max(durations)
        assert failures  # the victim's slots were unreachable for a while
        for topic in topics:
            reset = any(r[0] == topic for r in sink.resets)
            if not reset:
                # every event Redis holds (acknowledged and replicated, or stored while a
                # reply was lost) was delivered once, in order
                assert sink.of(topic) == history[topic], topic
                assert [e.offset for e in history[topic]] == list(range(1, len(history[topic]) + 1))
            # What publishers were told is stored is there, unless the fail-over lost it
            # (acknowledged, not replicated: on the victim's slots only); a lost event the
            # listener had delivered was reported (a reset).
            missing = [e for e in published[topic] if e not in history[topic]]
            assert not missing or topic in on_victim, (topic, missing)
            if any(e in sink.of(topic) for e in missing):
                assert reset, (topic, missing)
        for topic in on_victim:
            assert listener_of(store, topic) == ("127.0.0.1", replica.port)
        # how long the victim's slots took a publish: from the kill to the first event stored there
        back = min(e.time for t in on_victim for e in published[t] if e.time > killed_at[0]) - killed_at[0]
        logger.info("first publish stored on the killed primary's slots %.0f ms after the kill", back)
        assert back < 10_000


async def test_a_reshard_while_topics_in_the_moving_slots_are_subscribed_loses_nothing(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    cluster = redis_cluster_factory()
    source, target = cluster.primaries()[:2]
    moving = set(cluster.slots_of(source)[:200])  # redis-cli moves the source's lowest slots
    topics = topics_on(cluster, source, 12, slots=moving) + [f"stay:{i}" for i in range(12)]
    async with attached(cluster_store(cluster, publish_timeout=5)) as (store, sink):
        published = await publishing_through(
            store, sink, topics, lambda: cluster.reshard(source, target, len(moving)), after=200
        )
        history = await delivered_as_stored(store, sink, topics)
        assert set(cluster.slots_of(target)) >= moving
        for topic in topics:
            assert published[topic] == history[topic], topic
            assert sink.of(topic) == history[topic], topic
        assert sink.resets == []
        for topic in topics[:12]:
            assert listener_of(store, topic) == ("127.0.0.1", target.port)


async def test_lost_writes_after_a_failover_takeover_reset_the_topic(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    # The "Lost writes", on a cluster: the replica misses the last acknowledged
    # events, the primary dies, the replica is promoted with CLUSTER FAILOVER TAKEOVER
    # and the topic's epoch; new publishes reuse the lost offsets.
    cluster = redis_cluster_factory()
    primary = cluster.primaries()[0]
    replica = cluster.replica_of(primary)
    (topic,) = topics_on(cluster, primary, 1)
    async with attached(cluster_store(cluster, publish_timeout=5)) as (store, sink):
        delivered_at_reset: list[int] = []
        record_reset = sink.reset

        def reset(reset_topic: str, reason: str) -> None:
            delivered_at_reset.append(len(sink.of(reset_topic)))
            record_reset(reset_topic, reason)

        sink.reset = reset  # type: ignore[method-assign]
        await store.subscribe(topic)
        kept = await store.append(topic, [("e", str(i)) for i in range(3)])
        await anyio.to_thread.run_sync(
            wait_until,
            lambda: (
                replica.info("replication")["slave_repl_offset"] >= primary.info("replication")["master_repl_offset"]
            ),
            10,
            "the replica caught up",
        )
        replica.freeze()
        primary.execute("CLIENT", "KILL", "TYPE", "replica")  # SIGSTOP alone: the kernel buffers the stream
        lost = await store.append(topic, [("e", "lost 4"), ("e", "lost 5")])  # acknowledged by the primary
        await sink.wait_for(lambda: len(sink.of(topic)) == 5)
        primary.kill()
        replica.thaw()
        await anyio.to_thread.run_sync(lambda: cluster.failover(replica, mode="TAKEOVER"))
        reused = [await publish_until_stored(store, topic, f"new{i}", f"new {i}") for i in range(3)]
        assert [(e.epoch, e.offset) for e in reused] == [(kept[0].epoch, 4), (kept[0].epoch, 5), (kept[0].epoch, 6)]
        await sink.wait_for(lambda: any(r[0] == topic for r in sink.resets), timeout=20)
        reason = next(r[1] for r in sink.resets if r[0] == topic)
        assert "head moved back" in reason or "reused their offsets" in reason
        assert sink.of(topic)[:5] == kept + lost
        # Nothing of the new history was passed off as the continuation of the old one:
        # after the reset, the topic goes on from where Redis stood then.
        assert delivered_at_reset == [5]
        (last,) = await store.append(topic, [("e", "after")])
        await sink.wait_for(lambda: sink.of(topic)[-1] == last)
        later = sink.of(topic)[5:]
        assert later == [*reused, last][len(reused) + 1 - len(later) :]


async def test_after_lost_writes_and_a_takeover_every_client_resumes_unrecovered(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    # The same lost writes, seen by clients of one Replay that stays up on the cluster:
    # one connected throughout (closed with 1013 by the reset), one that left after
    # offset 4. Both resume from their last event, with its time, after new publishes
    # carried the head past the old one: neither may skip the reused offsets in silence.
    cluster = redis_cluster_factory()
    primary = cluster.primaries()[0]
    replica = cluster.replica_of(primary)
    (topic,) = topics_on(cluster, primary, 1)
    replay = Replay(cluster_store(cluster, publish_timeout=5), authorize=allow_all)
    async with running(make_app(replay)) as app:
        async with connect(app) as connected:
            async with connect(app) as leaving:
                epoch = (await connected.subscribe(topic))["epoch"]
                await leaving.subscribe(topic)
                await replay.publish_many(topic, [("e", i) for i in range(3)])
                await anyio.to_thread.run_sync(
                    wait_until,
                    lambda: (
                        replica.info("replication")["slave_repl_offset"]
                        >= primary.info("replication")["master_repl_offset"]
                    ),
                    10,
                    "the replica caught up",
                )
                replica.freeze()
                primary.execute("CLIENT", "KILL", "TYPE", "replica")
                await replay.publish_many(topic, [("e", i) for i in range(3, 5)])  # acknowledged, then lost
                got = await connected.events(5)
                assert [e["offset"] for e in got] == [1, 2, 3, 4, 5]
                left_at = (await leaving.events(4))[-1]
            primary.kill()
            replica.thaw()
            await anyio.to_thread.run_sync(lambda: cluster.failover(replica, mode="TAKEOVER"))
            reused = []
            with anyio.fail_after(30):
                while len(reused) < 3:
                    try:
                        (event,) = await replay.publish_many(topic, [("e", f"new{len(reused)}")])
                    except StoreUnavailable:
                        await anyio.sleep(0.05)  # a publisher's retry pause, not synchronisation
                        continue
                    reused.append(event)
            assert [(e.epoch, e.offset) for e in reused] == [(epoch, 4), (epoch, 5), (epoch, 6)]
            # the listener reset the topic: closed with 1013, and nothing of the new history before
            frames = []
            with anyio.fail_after(20), pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    frames.append(await connected.recv(within=20))
            assert closed.value.code == 1013
            assert [frame for frame in frames if frame["type"] == "event"] == []
        for cursor in (got[-1], left_at):
            async with connect(app) as client:
                sub = await client.subscribe(topic, epoch=epoch, offset=cursor["offset"], time=cursor["time"])
                assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 6)
                replayed = await client.events(6)
                assert [e["data"] for e in replayed[3:]] == ["new0", "new1", "new2"]
