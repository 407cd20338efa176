"""The chaos runner's short version (the long one: ``python -m tests.chaos.runner``, docs/reliability.md).

2 uvicorn workers on one Redis (AOF), 50 clients on 10 topics dropping and
reconnecting to either worker, a steady publisher, and ~25 s of faults (each
kind at least once: SIGKILL a worker, restart Redis, CLIENT KILL the live
listeners, pause a client). The seed is printed; ``CHAOS_SEED=<seed>`` replays
a run. Required: nothing lost, duplicated within a subscription, out of order
or ``recovered: false``, and every acknowledged publish stored exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from tests.chaos.runner import run_chaos
from tests.redis_server import _require_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

DURATION = float(os.environ.get("CHAOS_DURATION", "25"))


async def test_chaos_short(tmp_path: Path) -> None:
    _require_redis_server()
    seed = int(os.environ.get("CHAOS_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"\nchaos seed {seed} (replay: CHAOS_SEED={seed} pytest tests/chaos)")
    with anyio.fail_after(DURATION + 180):
        report = await run_chaos(DURATION, seed, clients=50, topics=10, rate=30.0, workdir=tmp_path)
    summary = report.summary()
    print(f"chaos: {json.dumps(summary)}")
    assert report.caught_up, summary
    counts = {
        key: summary[key]
        for key in (
            "lost",
            "duplicated",
            "out_of_order",
            "not_recovered",
            "wrong_data",
            "acked_missing",
            "stored_twice",
            "server_tracebacks",
        )
    }
    assert counts == dict.fromkeys(counts, 0), (seed, summary["problems"])
    assert set(report.faults) == {"kill_worker", "restart_redis", "kill_listener", "pause_client"}, report.faults
    assert report.events_checked >= report.published  # every client checked its topics' streams
    assert report.ok


def test_the_checker_counts_what_it_must() -> None:
    """The verdict is not vacuous: a duplicate, a hole, a reordering, a gap and wrong data are all counted."""
    import random

    from tests.chaos.runner import ChaosClient, ChaosReport, Sub, check

    report = ChaosReport(seed=0, duration=0, clients=1, topics=1)
    client = ChaosClient(0, ["t"], random.Random(0), report)
    stream = {"t": [{"k": k} for k in range(6)]}  # offsets 1..6
    client.log["t"] = [
        Sub("a", "E", 3, 3, False, False, [1, 2, 2, 3], [{"k": 0}, {"k": 1}, {"k": 1}, {"k": 2}]),  # duplicate
        Sub("b", "E", 6, 1, True, False, [6, 5], [{"k": 5}, {"k": 9}]),  # not recovered, reordered, wrong data
    ]
    check([client], stream, {"t": "E"}, [("t", 4, 3), ("t", 7, 7)], report)
    assert (report.duplicated, report.not_recovered, report.out_of_order, report.wrong_data) == (1, 1, 1, 1)
    assert report.lost == 1  # offset 4 never arrived
    assert report.acked_missing == 1  # offset 7 was acknowledged but is not in the stream
    assert report.events_checked == 6
    assert not report.ok
