"""RedisStore on a Redis Cluster: routing by slot, sharded pub/sub, a listener per primary.

A real 3-primary, 3-replica cluster (tests/redis_cluster.py) shared by the
tests here (each uses its own prefix and leaves the topology as it found it).
Fail-overs and migrations, which change it, are in test_cluster_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
import redis.asyncio

from starlette_replay import Cursor, RedisStore, StoreError
from starlette_replay.stores.redis._codec import packer
from tests.redis.test_health import BAD_WITHIN, GOOD_WITHIN, INTERVAL, health_becomes
from tests.redis_cluster import LocalCluster, topic_slot, wait_until
from tests.redis_server import RedisServer, attached

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def cluster_store(cluster: LocalCluster, **options: Any) -> RedisStore:
    options.setdefault("publish_timeout", 3)
    options.setdefault("prefix", f"c{secrets.token_hex(4)}")
    return RedisStore.from_url(cluster.url, cluster=True, **options)


def spread(cluster: LocalCluster, topics: list[str]) -> Counter[int]:
    """How many of ``topics`` each primary (by port) holds."""
    owners = {slot: node.port for node in cluster.primaries() for slot in cluster.slots_of(node)}
    return Counter(owners[topic_slot(topic)] for topic in topics)


def pubsub_clients(cluster: LocalCluster, name: str) -> dict[int, int]:
    """Per primary (by port): the pub/sub connections named ``name``."""
    counts = {}
    for node in cluster.primaries():
        listing = node.execute("CLIENT", "LIST", "TYPE", "pubsub").decode()
        counts[node.port] = sum(f" name={name} " in f" {line} " for line in listing.splitlines())
    return counts


async def test_topics_spread_over_every_shard_are_stored_and_delivered_in_order(redis_cluster: LocalCluster) -> None:
    name = f"spread{secrets.token_hex(3)}"
    topics = [f"room:{i}" for i in range(60)]
    counts = spread(redis_cluster, topics)
    assert len(counts) == 3 and min(counts.values()) >= 10, counts  # every shard holds some
    async with attached(cluster_store(redis_cluster, client_name=name)) as (store, sink):
        assert store.cluster
        for topic in topics:
            await store.subscribe(topic)
        published: dict[str, list[Any]] = {topic: [] for topic in topics}

        async def publish(topic: str) -> None:
            for i in range(5):
                published[topic] += await store.append(topic, [("e", str(i)), ("e", f'"{i}b"')])

        async with anyio.create_task_group() as tg:
            for topic in topics:
                tg.start_soon(publish, topic)
        await sink.wait_for(lambda: len(sink.events) == 60 * 10)
        for topic in topics:
            assert [e.offset for e in published[topic]] == list(range(1, 11))
            assert sink.of(topic) == published[topic]
            assert await store.read(topic, 0, 100) == published[topic]
        assert sink.resets == []
        # one pub/sub connection per primary, never one per topic
        assert pubsub_clients(redis_cluster, name) == {node.port: 1 for node in redis_cluster.primaries()}
        assert store.commands_in_flight == 0  # every command answered (summed over the nodes)
        # and each topic's keys live on the primary of its slot
        for topic in topics[:6]:
            owner = redis_cluster.owner(topic_slot(topic))
            with owner.client() as client:
                assert client.exists(f"{store.prefix}:{{{topic}}}:meta", f"{store.prefix}:{{{topic}}}:log") == 2


async def test_a_cluster_client_the_app_built_resp3_decoding_lends_its_settings_and_stays_open(
    redis_cluster: LocalCluster,
) -> None:
    first = redis_cluster.primaries()[0]
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=first.port, protocol=3, decode_responses=True)
    try:
        store = RedisStore(client, prefix=f"c{secrets.token_hex(4)}", publish_timeout=3)
        async with attached(store) as (store, sink):
            await store.subscribe("t")
            (event,) = await store.append("t", [("e", "1")], idempotency_key="k")
            assert await store.append("t", [("e", "other")], idempotency_key="k") == [event]
            await sink.wait_for(lambda: len(sink.of("t")) == 1)
            assert sink.of("t") == [event]
            await store.save_cursor("alice", "t", Cursor(event.epoch, 1))
            assert await store.load_cursor("alice", "t") == Cursor(event.epoch, 1)
            assert (await store.position("t")).head == 1
        assert await client.ping()  # aclose() left the app's client open
    finally:
        await client.aclose()


async def test_the_append_script_publishes_with_spublish_on_the_topics_shard(redis_cluster: LocalCluster) -> None:
    def calls(node: Any, command: str) -> int:
        return int(node.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    async with attached(cluster_store(redis_cluster)) as (store, sink):
        owner = redis_cluster.owner(topic_slot("t"))
        before = {node.port: (calls(node, "spublish"), calls(node, "publish")) for node in redis_cluster.primaries()}
        await store.subscribe("t")
        (event,) = await store.append("t", [("e", '"x"')])
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        assert sink.of("t") == [event]
        after = {node.port: (calls(node, "spublish"), calls(node, "publish")) for node in redis_cluster.primaries()}
        assert after[owner.port][0] - before[owner.port][0] == 1
        # classic PUBLISH (copied to every node of a cluster) is not used
        assert all(after[port][1] == before[port][1] for port in before)


async def test_hundreds_of_topics_subscribed_at_once_share_one_pub_sub_connection_per_primary(
    redis_cluster: LocalCluster,
) -> None:
    name = f"many{secrets.token_hex(3)}"
    topics = [f"many:{i}" for i in range(300)]
    async with attached(cluster_store(redis_cluster, client_name=name)) as (store, sink):
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for topic in topics:
                    tg.start_soon(store.subscribe, topic)
        assert sum(len(listener.topics) for listener in store._listener._nodes.values()) == 300
        assert pubsub_clients(redis_cluster, name) == {node.port: 1 for node in redis_cluster.primaries()}
        for topic in topics[::30]:
            await store.append(topic, [("e", "1")])
        await sink.wait_for(lambda: len(sink.events) == 10)
        assert sink.resets == []


async def test_unsubscribe_stops_delivery_and_releases_the_channel(redis_cluster: LocalCluster) -> None:
    async with attached(cluster_store(redis_cluster)) as (store, sink):
        await store.subscribe("t")
        await store.subscribe("marker")
        channel = f"{store.prefix}:{{t}}:live".encode()
        owner = redis_cluster.owner(topic_slot("t"))
        assert channel in owner.execute("PUBSUB", "SHARDCHANNELS")
        await store.unsubscribe("t")
        await store.append("t", [("e", "1")])
        await store.append("marker", [("e", "m")])
        await sink.wait_for(lambda: len(sink.of("marker")) == 1)
        assert sink.of("t") == []
        await anyio.to_thread.run_sync(
            wait_until, lambda: channel not in owner.execute("PUBSUB", "SHARDCHANNELS"), 5, "unsubscribed"
        )


async def test_the_slot_map_comes_from_redis_py_s_public_cluster_api(redis_cluster: LocalCluster) -> None:
    # What the routing relies on, pinned for the redis-py version installed:
    # get_node_from_key, get_primaries, get_node, get_default_node (public), and
    # nodes_manager.initialize() for a refresh (an attribute without underscore).
    async with redis.asyncio.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port) as client:
        await client.initialize()
        owner = redis_cluster.owner(topic_slot("user:42"))
        node = client.get_node_from_key("replay:{user:42}:meta")
        assert node is not None and (node.host, node.port) == ("127.0.0.1", owner.port)
        assert sorted(n.port for n in client.get_primaries()) == sorted(n.port for n in redis_cluster.primaries())
        assert client.get_node(host="127.0.0.1", port=owner.port) is node
        assert client.get_default_node() in client.get_primaries()
        assert "host" in node.connection_kwargs and node.connection_class is not None
        await client.nodes_manager.initialize()
        assert client.get_node_from_key("replay:{user:42}:meta").port == owner.port  # type: ignore[union-attr]


async def test_a_cluster_without_sharded_pub_sub_is_refused_naming_what_is_needed(
    redis_cluster_factory: Callable[..., LocalCluster],
) -> None:
    # Redis 6 has no SPUBLISH; here Redis 7 with the command renamed away stands in for it.
    cluster = redis_cluster_factory(replicas=0, extra=("--rename-command", "SPUBLISH", ""))
    store = RedisStore.from_url(cluster.url, cluster=True, publish_timeout=3)
    with pytest.raises(StoreError, match=r"Redis 7\.0 or later.*sharded pub/sub \(SPUBLISH, SSUBSCRIBE\)"):
        async with attached(store):
            pass


async def test_a_call_expecting_two_replies_gets_the_second_and_the_others_stay_matched(
    redis_server: RedisServer,
) -> None:
    # What ASK redirections use (ASKING + the command), on one Redis: the first reply
    # (here an error, ASKING outside a cluster) is dropped, the second is the call's.
    pack = packer()
    store = RedisStore.from_url(redis_server.url, connections=2)
    try:
        deadline = asyncio.get_running_loop().time() + 5
        calls = [
            store._pipes.call(pack(("ASKING",)) + pack(("ECHO", f"b{i}")), deadline, replies=2)
            if i % 3 == 0
            else store._pipes.call(pack(("ECHO", f"c{i}")), deadline)
            for i in range(300)
        ]
        with anyio.fail_after(10):
            replies = await asyncio.gather(*calls)
        assert replies == [(f"b{i}" if i % 3 == 0 else f"c{i}").encode() for i in range(300)]
    finally:
        await store.aclose()


async def test_startup_checks_the_durability_settings_of_every_primary(
    redis_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    primaries = redis_cluster.primaries()
    careless = primaries[-1]
    careless.execute("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="starlette_replay.stores.redis"):
            async with attached(cluster_store(redis_cluster)):
                pass
    finally:
        careless.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1 and f"allkeys-lru on 127.0.0.1:{careless.port}" in warnings[0], warnings
    assert "appendonly=" not in caplog.text  # the others are durable


async def test_health_is_ready_once_every_primary_s_listener_receives_the_probe(redis_cluster: LocalCluster) -> None:
    # The probe is a classic PUBLISH (a cluster copies it to every node), received through
    # a classic SUBSCRIBE on each primary's listener; watched topics or not, each primary
    # has one. Kept out of one primary (its SUBSCRIBE refused), the store is not ready.
    name = f"health{secrets.token_hex(3)}"
    store = cluster_store(redis_cluster, client_name=name, health_check_interval=INTERVAL)
    async with attached(store) as (store, _):
        await health_becomes(store, True, BAD_WITHIN)
        assert store.health().checks == {"redis_commands": "ok", "redis_listener": "ok"}
        assert pubsub_clients(redis_cluster, name) == {node.port: 1 for node in redis_cluster.primaries()}
        shut_out = redis_cluster.primaries()[1]
        shut_out.execute("ACL", "SETUSER", "default", "-subscribe")
        try:
            listing = shut_out.execute("CLIENT", "LIST", "TYPE", "pubsub").decode()
            (line,) = [line for line in listing.splitlines() if f" name={name} " in f" {line} "]
            shut_out.execute("CLIENT", "KILL", "ID", line.split()[0].split("=")[1])
            await health_becomes(store, False, BAD_WITHIN)
            found = store.health()
            assert found.checks["redis_commands"] == "ok"  # only one shard's listener is out
            assert found.checks["redis_listener"].startswith("no probe received")
        finally:
            shut_out.execute("ACL", "SETUSER", "default", "+subscribe")
        await health_becomes(store, True, GOOD_WITHIN)
