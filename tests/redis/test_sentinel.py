"""RedisStore on a Sentinel-managed primary: a fail-over while publishing and subscribed.

One primary, one replica and three sentinels, each a real ``redis-server`` on
a free port (sentinels run ``redis-server <conf> --sentinel``). The store is
given ``Sentinel(...).master_for(name)``: its own connections take that client's
settings, so each asks the sentinels for the current primary when it connects.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel

from starlette_replay import Event, RedisStore, StoreUnavailable
from tests.redis_server import REDIS_SERVER, RecordingSink, RedisServer, free_port, replica_caught_up

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SERVICE = "replay-test"


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``SERVICE`` on the primary's port."""

    def __init__(self, directory: Path, primary_port: int) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.log = directory / "sentinel.log"
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(self.config), "--sentinel", "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition of processes outside the event loop (set-up, not a test step)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout}s")
        time.sleep(0.05)


def _master_state(sentinel: SentinelProcess) -> dict[str, str]:
    try:
        with sentinel.client() as client:
            return {str(k): str(v) for k, v in client.execute_command("SENTINEL", "MASTER", SERVICE).items()}
    except redis.RedisError:
        return {}


class SentinelSetup:
    def __init__(self, tmp: Path) -> None:
        self.primary = RedisServer(tmp / "primary").start()
        self.replica = RedisServer(tmp / "replica", extra=("--replicaof", "127.0.0.1", str(self.primary.port))).start()
        self.sentinels = [SentinelProcess(tmp / f"sentinel-{i}", self.primary.port) for i in range(3)]
        wait_until(self._settled, 30, "watched by three sentinels with one replica")

    def _settled(self) -> bool:
        states = [_master_state(sentinel) for sentinel in self.sentinels]
        return all(
            (state.get("num-other-sentinels"), state.get("num-slaves"), state.get("flags")) == ("2", "1", "master")
            for state in states
        )

    def primary_port(self) -> int:
        with self.sentinels[0].client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def caught_up(self) -> bool:
        return replica_caught_up(self.primary, self.replica)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    setup = SentinelSetup(tmp_path)
    try:
        yield setup
    finally:
        setup.stop()


async def test_a_sentinel_fail_over_while_publishing_and_subscribed(sentinel_setup: SentinelSetup) -> None:
    setup = sentinel_setup
    sentinel = redis.asyncio.sentinel.Sentinel([("127.0.0.1", s.port) for s in setup.sentinels], socket_timeout=2)
    client = sentinel.master_for(SERVICE, socket_timeout=2)
    store = RedisStore(client, prefix="sentinel", publish_timeout=2, health_check_interval=0.5)
    sink = RecordingSink()
    topics = ["a", "b", "c"]
    acked: list[Event] = []
    failures: list[float] = []
    try:
        async with store.connect(sink):
            for topic in topics:
                await store.subscribe(topic)
            stop = anyio.Event()

            async def publisher(p: int) -> None:
                i = 0
                while not stop.is_set():
                    topic = topics[(p + i) % 3]
                    started = time.monotonic()
                    try:
                        (event,) = await store.append(topic, [("e", json.dumps([p, i]))], idempotency_key=f"{p}-{i}")
                    except StoreUnavailable:
                        failures.append(time.monotonic() - started)
                        await anyio.sleep(0.05)  # a real publisher's retry pause, not synchronisation
                        continue  # the same key again: stored at most once
                    acked.append(event)
                    i += 1

            async with anyio.create_task_group() as tg:
                for p in range(20):
                    tg.start_soon(publisher, p)
                await sink.wait_for(lambda: len(sink.events) >= 200, timeout=20)
                old_port = setup.primary.port
                await anyio.to_thread.run_sync(wait_until, setup.caught_up, 10, "replica caught up")
                with setup.sentinels[0].client() as sentinel_client:
                    sentinel_client.execute_command("SENTINEL", "FAILOVER", SERVICE)
                failed_over = time.monotonic()
                await anyio.to_thread.run_sync(
                    wait_until, lambda: setup.primary_port() != old_port, 30, "failed over to the replica"
                )
                # publishes go through on the new primary, and the listener follows it
                seen = len(acked)
                await sink.wait_for(lambda: len(acked) >= seen + 200 and len(sink.events) >= seen + 200, timeout=30)
                recovered_after = time.monotonic() - failed_over
                stop.set()
            assert setup.primary_port() == setup.replica.port
            # every publish that failed, failed within its bound (generous: CI machines are loaded)
            assert all(elapsed < 2 + 1.5 for elapsed in failures)
            assert recovered_after < 30
            await sink.wait_for(lambda: len(sink.events) >= len(acked) or bool(sink.resets), timeout=20)
            for topic in topics:
                stored = await store.read(topic, 0, 100_000)
                mine = sorted((e for e in acked if e.topic == topic), key=lambda e: e.offset)
                if any(reset_topic == topic for reset_topic, _ in sink.resets):
                    continue  # the fail-over lost acknowledged events and the store said so
                # no loss reported: then nothing acknowledged was lost, nothing doubled,
                # and every process's listener delivered exactly the log
                oldest = stored[0].offset  # the history is trimmed at history_size
                assert [e.offset for e in stored] == list(range(oldest, oldest + len(stored)))
                assert {e for e in mine if e.offset >= oldest} <= set(stored)
                delivered = sink.of(topic)
                assert [e.offset for e in delivered] == list(range(1, len(delivered) + 1))
                assert [e for e in delivered if e.offset >= oldest] == stored
    finally:
        await store.aclose()
        await client.aclose()
        await sentinel.aclose()
