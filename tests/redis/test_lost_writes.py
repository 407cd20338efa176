"""A fail-over that lost acknowledged writes but kept the epoch (protocol.md, "Reused offsets").

A real primary and replica: the replica is stopped (SIGSTOP) while events are
published and acknowledged, the primary is killed, the replica resumed and
promoted by hand, and new events carry the head past the old one. The new events
reuse the lost offsets: a client that resumes from its cursor must be told
(``recovered: false``), never silently skip them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from starlette_replay import RedisStore, Replay, allow_all
from tests.helpers import Client, connect, make_app, running
from tests.redis_server import REDIS_SERVER, RedisServer, replica_caught_up

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

WITHIN = 20.0


class PrimaryAndReplica:
    def __init__(self, tmp: Path) -> None:
        self.primary = RedisServer(tmp / "primary").start()
        self.replica = RedisServer(tmp / "replica", extra=("--replicaof", "127.0.0.1", str(self.primary.port))).start()

    def wait_caught_up(self) -> None:
        deadline = time.monotonic() + WITHIN
        while not replica_caught_up(self.primary, self.replica):
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.02)

    def stop(self) -> None:
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[PrimaryAndReplica]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    setup = PrimaryAndReplica(tmp_path)
    try:
        yield setup
    finally:
        setup.stop()


def replay_on(server: RedisServer) -> Replay:
    store = RedisStore.from_url(server.url, prefix="lw", publish_timeout=2, health_check_interval=1)
    return Replay(store, authorize=allow_all)


async def take_events(client: Client, n: int) -> list[dict[str, Any]]:
    return await client.events(n, within=WITHIN)


async def test_a_fail_over_that_lost_writes_is_never_a_silent_skip(pair: PrimaryAndReplica) -> None:
    old = replay_on(pair.primary)
    async with running(make_app(old)) as old_app, connect(old_app) as connected, connect(old_app) as leaving:
        # "connected" stays until its server goes; "leaving" is a client that went away meanwhile
        sub = await connected.subscribe("t")
        await leaving.subscribe("t")
        epoch = sub["epoch"]
        await old.publish_many("t", [("e", i) for i in range(3)])
        await anyio.to_thread.run_sync(pair.wait_caught_up)
        # The replica misses what follows: stopped, and its link cut on the primary (with SIGSTOP
        # alone the kernel buffers the stream and the replica applies it after SIGCONT).
        pair.replica.freeze()
        with pair.primary.client() as client:
            assert client.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
        await old.publish_many("t", [("e", i) for i in range(3, 5)])  # acknowledged: stored on the primary
        got = await take_events(connected, 5)
        assert [e["offset"] for e in got] == [1, 2, 3, 4, 5]
        left_at = (await take_events(leaving, 4))[-1]  # it processed up to 4
        pair.primary.kill()
    # The old primary is gone for good: its server is moved to the new one (a redeploy), which
    # closed the connected client too. Both resume there from the last event they had.

    pair.replica.thaw()
    with pair.replica.client() as client:
        client.execute_command("REPLICAOF", "NO", "ONE")
    new = replay_on(pair.replica)
    async with running(make_app(new)) as new_app:
        reused = await new.publish_many("t", [("e", f"new{i}") for i in range(3)])
        assert [(e.epoch, e.offset) for e in reused] == [(epoch, 4), (epoch, 5), (epoch, 6)]  # offsets reused
        for cursor in (got[-1], left_at):  # both clients resume from the last event they had
            async with connect(new_app) as client:
                sub = await client.subscribe("t", epoch=epoch, offset=cursor["offset"], time=cursor["time"])
                # offsets 4 and 5 now hold other events: without the time check, this would be
                # "recovered" with the new 4 and 5 skipped (or doubled) in silence
                assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 6)
                replayed = await take_events(client, 6)
                assert [e["data"] for e in replayed[3:]] == ["new0", "new1", "new2"]
