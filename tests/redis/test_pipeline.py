"""RedisStore with hundreds of commands in flight on its few pipelined connections.

What must hold however many topics publish at once: every reply reaches its
own caller; a cancelled caller never puts the replies out of step; a lost or
frozen connection fails its commands within ``publish_timeout`` and loses
nothing that was acknowledged; and Redis never sees more than the configured
number of connections (plus the listener's).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

from starlette_replay import Event, RedisStore, StoreUnavailable
from tests.redis.test_network import through_cutter
from tests.redis_server import RedisServer, connected

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def data(topic: str, i: int) -> str:
    return json.dumps({"topic": topic, "i": i})


@contextmanager
def sampled_connections(server: RedisServer, name: str) -> Iterator[list[int]]:
    """Samples, every few ms in a thread, how many connections named ``name`` Redis holds."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with server.client() as client:
            while not done.is_set():
                samples.append(sum(1 for info in client.client_list() if info["name"] == name))
                done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(10)


async def test_every_reply_reaches_its_own_caller_with_hundreds_in_flight(redis_server: RedisServer) -> None:
    # 300 topics, topic i holding 1 + i % 7 events: reads and positions issued all at
    # once must each get their own topic's answer (a reply matched to the wrong
    # caller shows as another topic's data or head).
    topics = [f"own{i}" for i in range(300)]
    async with connected(redis_server.url, prefix="own", connections=2) as (store, _):
        appended: dict[str, list[Event]] = {topic: [] for topic in topics}

        async def fill(i: int, topic: str) -> None:
            for j in range(1 + i % 7):
                appended[topic] += await store.append(topic, [("e", data(topic, j))])

        async with anyio.create_task_group() as tg:
            for i, topic in enumerate(topics):
                tg.start_soon(fill, i, topic)
        read: dict[str, list[Event]] = {}
        heads: dict[str, int] = {}

        async def check(topic: str) -> None:
            read[topic] = await store.read(topic, 0, 100)
            heads[topic] = (await store.position(topic)).head

        async with anyio.create_task_group() as tg:
            for topic in topics:
                tg.start_soon(check, topic)
        for i, topic in enumerate(topics):
            assert [json.loads(e.raw) for e in read[topic]] == [{"topic": topic, "i": j} for j in range(1 + i % 7)]
            assert read[topic] == appended[topic]
            assert heads[topic] == 1 + i % 7


async def test_connections_stay_within_the_option_under_2000_concurrent_publishers(redis_server: RedisServer) -> None:
    topics = [f"b{i}" for i in range(2000)]
    async with connected(redis_server.url, prefix="bound", client_name="bound", connections=3) as (store, sink):
        for topic in topics[:20]:
            await store.subscribe(topic)
        stored: dict[str, list[Event]] = {}

        async def publisher(topic: str) -> None:
            events = []
            for j in range(3):
                events += await store.append(topic, [("e", data(topic, j))])
            stored[topic] = events

        with sampled_connections(redis_server, "bound") as samples:
            async with anyio.create_task_group() as tg:
                for topic in topics:
                    tg.start_soon(publisher, topic)
        assert len(stored) == 2000
        assert all([e.offset for e in events] == [1, 2, 3] for events in stored.values())
        assert samples and max(samples) <= 3 + 1  # the command connections and the listener's
        await sink.wait_for(lambda: all(len(sink.of(topic)) == 3 for topic in topics[:20]))


async def test_callers_cancelled_mid_pipeline_leave_the_others_in_step(redis_server: RedisServer) -> None:
    async with connected(redis_server.url, prefix="cancel", client_name="cancel", connections=1) as (store, _):
        await store.append("warm", [("e", "0")])  # the connection is open, the script loaded
        with redis_server.client() as client:
            opened = int(client.info("stats")["total_connections_received"])

        # Cancelled before the end of the loop turn that submitted them: never sent. (The
        # first of a turn goes out at once, on an idle connection; the rest wait for it.)
        tasks = [asyncio.create_task(store.append(f"early{i}", [("e", data("early", i))])) for i in range(100)]
        await asyncio.sleep(0)  # each task submitted its command; the pipe writes after this turn
        for task in tasks[1::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 2 == 0:
                assert isinstance(result, list) and result[0].offset == 1 and result[0].topic == f"early{i}"
            else:
                assert isinstance(result, asyncio.CancelledError)
                assert (await store.position(f"early{i}")).head == 0  # never sent, so never stored

        # Cancelled while Redis holds them (writes paused): sent, so their replies come
        # later and are read and dropped; the callers around them get their own.
        with redis_server.client() as client:
            client.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            tasks = [asyncio.create_task(store.append(f"late{i}", [("e", data("late", i))])) for i in range(100)]
            await anyio.wait_all_tasks_blocked()
            for task in tasks[::3]:
                task.cancel()
            await anyio.wait_all_tasks_blocked()
        finally:
            with redis_server.client() as client:
                client.execute_command("CLIENT", "UNPAUSE")
        with anyio.fail_after(10):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3:
                assert isinstance(result, list) and result[0].topic == f"late{i}", result
                assert json.loads(result[0].raw) == {"topic": "late", "i": i}
            else:
                assert isinstance(result, asyncio.CancelledError)
        for i in range(0, 100, 3):  # they were sent before their callers gave up: Redis ran them
            assert [json.loads(e.raw)["i"] for e in await store.read(f"late{i}", 0, 10)] == [i]
        (after,) = await store.append("warm", [("e", "1")])
        assert after.offset == 2
        with redis_server.client() as client:
            # only the three test clients above: no reconnect
            assert int(client.info("stats")["total_connections_received"]) == opened + 3


async def test_a_lone_command_is_written_at_once_through_redis_py_s_stream_writer(redis_server: RedisServer) -> None:
    # The pipe writes a lone command without waiting for its task, through redis-py's
    # private StreamWriter (redis-py has no public write that does not await a drain):
    # this fails the day redis-py renames it, and the fast path silently turns off.
    async with connected(redis_server.url, prefix="direct") as (store, _):
        await store.append("t", [("e", "1")])
        pipes = [pipe for pipe in store._pipes._slots if pipe is not None]
        assert pipes and all(isinstance(pipe._stream, asyncio.StreamWriter) for pipe in pipes)
        events = await asyncio.gather(*(store.append("t", [("e", str(i))]) for i in range(2, 50)))
        assert [e.offset for (e,) in events] == list(range(2, 50))


async def test_publish_timeout_holds_with_500_publishers_while_redis_is_stopped(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    timeout = 1.0
    async with connected(server.url, prefix="stop", publish_timeout=timeout) as (store, _):
        for i in range(8):
            await store.append(f"s{i}", [("e", "before")])  # every connection open and warm
        outcomes: dict[int, tuple[str, float]] = {}

        async def one(i: int) -> None:
            started = time.monotonic()
            try:
                await store.append(f"s{i % 250}", [("e", data("s", i))], idempotency_key=f"k{i}" if i % 2 else None)
            except StoreUnavailable:
                outcomes[i] = ("unavailable", time.monotonic() - started)
            else:
                outcomes[i] = ("stored", time.monotonic() - started)

        server.freeze()
        try:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for i in range(500):
                        tg.start_soon(one, i)
        finally:
            server.thaw()
        assert len(outcomes) == 500
        assert {kind for kind, _ in outcomes.values()} == {"unavailable"}
        # each within its bound; a generous margin: CI machines are loaded
        assert max(elapsed for _, elapsed in outcomes.values()) < timeout + 1.5

        # Redis back: the store works again and every log is dense
        with anyio.fail_after(10):
            while True:
                try:
                    await store.append("s0", [("e", "after")])
                    break
                except StoreUnavailable:
                    await anyio.sleep(0.05)  # reconnecting: retry pace, not a synchronisation
        for i in range(250):
            stored = await store.read(f"s{i}", 0, 100)
            assert [e.offset for e in stored] == list(range(1, len(stored) + 1))


async def publish_keyed(store: RedisStore, topic: str, key: str, raw: str) -> Event:
    """A careful publisher: the same idempotency key until Redis confirms."""
    with anyio.fail_after(30):
        while True:
            try:
                (event,) = await store.append(topic, [("e", raw)], idempotency_key=key)
                return event
            except StoreUnavailable:
                await anyio.sleep(0.02)  # a real publisher's retry pause, not synchronisation


async def publish_keyed_until(
    stop: anyio.Event, store: RedisStore, topics: list[str], p: int, acked: list[Event]
) -> None:
    """Publisher ``p``: keyed publishes round the topics until ``stop``, each retried until stored."""
    i = 0
    while not stop.is_set():
        topic = topics[(p + i) % len(topics)]
        acked.append(await publish_keyed(store, topic, f"{p}-{i}", data(topic, p * 1_000_000 + i)))
        i += 1


async def test_command_connections_killed_under_hundreds_in_flight_lose_nothing_acknowledged(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    topics = [f"k{i}" for i in range(50)]
    acked: list[Event] = []
    async with connected(server.url, prefix="kill", client_name="kill", publish_timeout=3) as (store, sink):
        for topic in topics:
            await store.subscribe(topic)
        stop = anyio.Event()

        def kill_commands() -> int:
            with server.client() as client:  # normal clients but this one: the command connections
                return int(client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))

        kills = 0
        async with anyio.create_task_group() as tg:
            for p in range(300):
                tg.start_soon(publish_keyed_until, stop, store, topics, p, acked)
            for round_ in range(5):
                await sink.wait_for(lambda round_=round_: len(acked) >= 300 * (round_ + 1), timeout=30)
                kills += await anyio.to_thread.run_sync(kill_commands)
            await sink.wait_for(lambda: len(acked) >= 300 * 6, timeout=30)  # publishing again after the last kill
            stop.set()
        assert kills >= 5
        await sink.wait_for(lambda: len(sink.events) >= len(acked), timeout=30)
        for topic in topics:
            mine = sorted((e for e in acked if e.topic == topic), key=lambda e: e.offset)
            stored = await store.read(topic, 0, 10_000)
            # every acknowledged event stored once (keyed retries return the first), nothing else
            assert stored == mine
            assert sink.of(topic) == stored
        assert sink.resets == []


async def test_redis_killed_and_restarted_under_hundreds_in_flight_loses_nothing_acknowledged(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory(appendonly=True)  # appendfsync always: an acknowledged write survives kill -9
    topics = [f"r{i}" for i in range(40)]
    acked: list[Event] = []
    async with connected(server.url, prefix="restart", publish_timeout=2) as (store, sink):
        for topic in topics:
            await store.subscribe(topic)
        stop = anyio.Event()

        async with anyio.create_task_group() as tg:
            for p in range(200):
                tg.start_soon(publish_keyed_until, stop, store, topics, p, acked)
            for round_ in range(2):
                await sink.wait_for(lambda round_=round_: len(acked) >= 200 * (round_ + 1) * 3, timeout=30)
                await anyio.to_thread.run_sync(server.restart)  # SIGKILL, then the same port and data
            await sink.wait_for(lambda: len(acked) >= 200 * 9, timeout=30)  # publishing again after the last one
            stop.set()
        await sink.wait_for(lambda: len(sink.events) >= len(acked), timeout=30)
        for topic in topics:
            mine = sorted((e for e in acked if e.topic == topic), key=lambda e: e.offset)
            stored = await store.read(topic, 0, 10_000)
            assert stored == mine  # every acknowledged event stored once, in one epoch, nothing else
            assert sink.of(topic) == stored
        assert sink.resets == []
        assert store.reconnects >= 3


async def test_a_lost_reply_with_many_in_flight_fails_unkeyed_and_retries_keyed(redis_server: RedisServer) -> None:
    async with through_cutter(redis_server) as (store, _sink, cutter):
        await store.append("warm", [("e", "0")])  # the script is loaded: the EVALSHAs below run it
        outcomes: dict[int, Event | str] = {}

        async def one(i: int) -> None:
            topic = f"cut{i % 40}"
            try:
                key = f"k{i}" if i % 2 else None
                (event,) = await store.append(topic, [("e", data(topic, i))], idempotency_key=key)
                outcomes[i] = event
            except StoreUnavailable as exc:
                assert "may or may not" in str(exc) and i % 2 == 0, (i, exc)
                outcomes[i] = "unknown"

        cutter.arm()
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert cutter.cuts == 1
        assert len(outcomes) == 200
        assert all(isinstance(outcomes[i], Event) for i in range(1, 200, 2))  # keyed: retried, stored
        for t in range(40):
            stored = await store.read(f"cut{t}", 0, 1000)
            assert [e.offset for e in stored] == list(range(1, len(stored) + 1))
            numbers = [json.loads(e.raw)["i"] for e in stored]
            assert len(numbers) == len(set(numbers))  # nothing stored twice
            for i in range(t, 200, 40):
                outcome = outcomes[i]
                if isinstance(outcome, Event):
                    assert outcome in stored


def subscribe_calls(server: RedisServer) -> int:
    with server.client() as client:
        return int(client.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))


async def test_a_thousand_topics_subscribe_in_batches_and_a_reconnect_repairs_them_all(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    topics = [f"many{i}" for i in range(1000)]
    async with connected(server.url, prefix="many", health_check_interval=1) as (store, sink):
        async with anyio.create_task_group() as tg:
            for topic in topics:
                tg.start_soon(store.subscribe, topic)
        # SUBSCRIBE commands queued in one loop turn go out as one (up to 1,000 channels)
        assert subscribe_calls(server) <= 20
        first = {topic: (await store.append(topic, [("e", data(topic, 1))]))[0] for topic in topics}
        await sink.wait_for(lambda: len(sink.events) == 1000)
        reconnects = store.reconnects
        assert await anyio.to_thread.run_sync(server.kill_pubsub_clients) == 1
        # published while the listener is away or resubscribing: repaired from the streams
        second: dict[str, Event] = {}

        async def publish(topic: str) -> None:
            (second[topic],) = await store.append(topic, [("e", data(topic, 2))])

        async with anyio.create_task_group() as tg:
            for topic in topics:
                tg.start_soon(publish, topic)
        await sink.wait_for(lambda: len(sink.events) == 2000, timeout=30)
        assert store.reconnects == reconnects + 1
        assert subscribe_calls(server) <= 40  # the resubscription was batched too
        for topic in topics:
            assert sink.of(topic) == [first[topic], second[topic]]
        assert sink.resets == []
