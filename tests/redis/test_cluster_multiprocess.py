"""Two uvicorn processes on one Redis Cluster: delivery across processes and resume, per shard,
and clients on topics whose slots move.

Real sockets end to end: ``websockets`` clients, uvicorn subprocesses running
``tests.redis.app`` with ``REPLAY_REDIS_CLUSTER=1``, 3-primary, 3-replica
clusters of tests/redis_cluster.py.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import anyio
import anyio.to_thread
import pytest

from starlette_replay import RedisStore, Replay
from starlette_replay.protocol import EventFrame, Subscribed, parse_server_frame
from tests.redis.test_cluster_faults import topics_on
from tests.redis.test_multiprocess import StreamingClient, events, open_client, publish_via, subscribe
from tests.redis_cluster import LocalCluster, topic_slot
from tests.servers import ServerFactory, UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]


def start_web(servers: ServerFactory, cluster: LocalCluster, prefix: str, name: str) -> UvicornServer:
    env = {"REPLAY_REDIS_URL": cluster.url, "REPLAY_PREFIX": prefix, "REPLAY_REDIS_CLUSTER": "1"}
    return servers(name=name, app="tests.redis.app:make_app", env=env)


async def test_published_in_a_received_in_b_on_every_shard_then_resumed_on_a(
    redis_cluster: LocalCluster, uvicorn_servers: ServerFactory
) -> None:
    prefix = f"cmp{secrets.token_hex(4)}"
    a = await anyio.to_thread.run_sync(start_web, uvicorn_servers, redis_cluster, prefix, "a")
    b = await anyio.to_thread.run_sync(start_web, uvicorn_servers, redis_cluster, prefix, "b")
    owners = {slot: node.port for node in redis_cluster.primaries() for slot in redis_cluster.slots_of(node)}
    topics = [f"room:{i}" for i in range(12)]
    assert len({owners[topic_slot(topic)] for topic in topics}) == 3  # every shard carries some
    cursors = {}
    async with await open_client(b.ws_url()) as on_b:
        for topic in topics:
            fresh = await subscribe(on_b, topic)
            assert (fresh.offset, fresh.resumed, fresh.recovered) == (0, False, False)
            cursors[topic] = fresh.epoch
        for topic in topics:
            assert await publish_via(a, topic, 2) == [1, 2]
        got = await events(on_b, 2 * len(topics))
        for topic in topics:
            assert [(e.offset, e.data) for e in got if e.topic == topic] == [(1, {"n": 0}), (2, {"n": 1})]
    # more is published while the client is away; it comes back on A from its cursors
    for topic in topics:
        assert await publish_via(b, topic, 3) == [3, 4, 5]
    async with await open_client(a.ws_url()) as on_a:
        for topic in topics:
            frame = {"type": "subscribe", "topic": topic, "epoch": cursors[topic], "offset": 2}
            await on_a.send(json.dumps(frame))
        replies: list[Subscribed] = []
        got = []
        with anyio.fail_after(15):
            while len(replies) < len(topics) or len(got) < 3 * len(topics):
                reply = parse_server_frame(await on_a.recv())
                if isinstance(reply, Subscribed):
                    replies.append(reply)
                elif isinstance(reply, EventFrame):
                    got.append(reply)
        for resumed in replies:
            assert (resumed.epoch, resumed.offset, resumed.resumed, resumed.recovered, resumed.replayed) == (
                cursors[resumed.topic],
                5,
                True,
                True,
                3,
            )
        for topic in topics:
            assert [e.offset for e in got if e.topic == topic] == [3, 4, 5]
        # and it stays live on A for what B publishes next
        assert await publish_via(b, topics[0], 1) == [6]
        assert [(e.topic, e.offset) for e in await events(on_a, 1)] == [(topics[0], 6)]


async def test_clients_on_topics_in_moving_slots_get_every_event_through_a_reshard(
    redis_cluster_factory: Callable[..., LocalCluster], uvicorn_servers: ServerFactory
) -> None:
    cluster = await anyio.to_thread.run_sync(redis_cluster_factory)
    source, target = cluster.primaries()[:2]
    moving = set(cluster.slots_of(source)[:200])  # redis-cli moves the source's lowest slots
    topics = topics_on(cluster, source, 4, slots=moving)
    prefix = f"cmp{secrets.token_hex(4)}"
    a = await anyio.to_thread.run_sync(start_web, uvicorn_servers, cluster, prefix, "a")
    b = await anyio.to_thread.run_sync(start_web, uvicorn_servers, cluster, prefix, "b")
    clients = [StreamingClient([url, url], topic) for topic in topics for url in (a.ws_url(), b.ws_url())]
    progress = anyio.Event()

    def changed() -> None:
        nonlocal progress
        progress.set()
        progress = anyio.Event()

    async def until(condition: Callable[[], bool], within: float = 30) -> None:
        with anyio.fail_after(within):
            while not condition():
                await progress.wait()

    published: dict[str, list[int]] = {topic: [] for topic in topics}
    resharded = anyio.Event()
    done = anyio.Event()
    store = RedisStore.from_url(cluster.url, cluster=True, prefix=prefix, publish_timeout=5)
    async with Replay(store) as publisher, anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(client.run, changed)
        await until(lambda: all(c.subscribed for c in clients))

        async def publish() -> None:
            i = after = 0
            while after < 100:
                topic = topics[i % len(topics)]
                event = await publisher.publish(topic, "tick", {"i": i}, idempotency_key=f"k{i}")
                published[topic].append(event.offset)
                i += 1
                after += resharded.is_set()
                await anyio.sleep(0.003)  # pacing the feed, not synchronising
            done.set()
            changed()

        tg.start_soon(publish)
        await until(lambda: all(len(c.offsets) >= 10 for c in clients))
        await anyio.to_thread.run_sync(cluster.reshard, source, target, len(moving))
        resharded.set()
        await until(lambda: done.is_set() and all(c.offsets[-1:] == published[c.topic][-1:] for c in clients))
        for client in clients:
            await client.stop()
    assert set(cluster.slots_of(target)) >= moving
    for client in clients:
        assert published[client.topic] == list(range(1, len(published[client.topic]) + 1))
        assert client.offsets == published[client.topic]  # no gap, no duplicate
        assert len(client.subscribed) == 1  # and never closed: the servers followed the slots
