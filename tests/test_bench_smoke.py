"""Smoke runs of the benchmarks (bench/) at tiny sizes, to keep them from rotting.

No timed assertions: each benchmark must run to the end and report a sane
structure (every contender measured, every event delivered, no gap or duplicate
for this library, a ratio to the baseline). The library's contenders and the
bare baseline always run; a peer (broadcaster, python-socketio) is skipped only
when its venv from ``bench/setup.sh`` is absent.
"""

from __future__ import annotations

import math
import shutil
from typing import Any

import pytest

from bench import micro
from bench.run import CONTENDERS, Config, available, run_benchmark

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed: `make system` installs it"
)

OURS = ["bare", "replay-memory", "replay-redis"]
SSE = ["replay-memory-sse", "replay-redis-sse"]  # the same servers' SSE route
PEERS = [name for name in CONTENDERS if name not in [*OURS, *SSE, "replay-cluster"]]


def quick(name: str, contenders: list[str]) -> dict[str, Any]:
    return run_benchmark(name, Config(quick=True, reps=1, contenders=contenders, verbose=False))


def check_delivery(result: dict[str, Any], contenders: list[str]) -> None:
    rows = result["rows"]
    assert {row["contender"] for row in rows} == set(contenders)
    for row in rows:
        assert row["received"] == row["expected"] > 0, row
        assert row["rate"] > 0 and math.isfinite(row["seconds"]), row
        assert not row["timed_out"], row
        if row["contender"].startswith("replay"):
            assert (row["gaps"], row["duplicates"], row["closes"]) == (0, 0, {}), row


def check_ratios(result: dict[str, Any], baseline: str) -> None:
    table = result["table"]
    assert table, result
    for entry in table:
        assert entry["median"] > 0 and entry["ratio"] is not None and entry["ratio"] > 0, entry
        if entry["contender"] == baseline:
            assert entry["ratio"] == 1.0


def test_fanout() -> None:
    result = quick("fanout", OURS)
    check_delivery(result, OURS)
    check_ratios(result, "bare")
    assert all(row["server_cpu_us"] >= 0 for row in result["rows"])
    assert all(entry["cpu_us"] >= 0 for entry in result["table"])


def test_latency() -> None:
    result = quick("latency", OURS)
    check_delivery(result, OURS)
    check_ratios(result, "bare")
    for row in result["rows"]:
        latency = row["latency_ms"]
        assert latency["samples"] == row["expected"]
        assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"], row


def test_catchup() -> None:
    result = quick("catchup", OURS)
    assert {row["contender"] for row in result["rows"]} == {"raw-redis-loop", "replay-redis", "replay-memory"}
    for row in result["rows"]:
        assert row["received"] == row["expected"] and (row["gaps"], row["duplicates"]) == (0, 0), row
    check_ratios(result, "raw-redis-loop")


def test_publish() -> None:
    result = quick("publish", OURS)
    assert {(row["contender"], row["concurrency"]) for row in result["rows"]} == {
        (name, c) for name in ("replay-redis", "raw-redis-script", "raw-xadd-publish") for c in (1, 50)
    }
    assert all(row["n"] > 0 and row["rate"] > 0 for row in result["rows"])
    check_ratios(result, "raw-redis-script")


def test_memory() -> None:
    result = quick("memory", ["bare", "replay-memory"])
    assert {row["contender"] for row in result["rows"]} == {"bare", "replay-memory"}
    for row in result["rows"]:
        assert row["connections"] == 20 and row["rss_after_kib"] > 0, row
    assert {entry["contender"] for entry in result["table"]} == {"bare", "replay-memory"}


@pytest.mark.parametrize("name", ["fanout", "latency"])
def test_sse_beside_the_websocket_route(name: str) -> None:
    contenders = ["bare", "replay-memory", *SSE]
    result = quick(name, contenders)
    check_delivery(result, contenders)
    check_ratios(result, "bare")


def test_memory_per_idle_sse_stream() -> None:
    result = quick("memory", ["replay-memory", "replay-memory-sse"])
    assert {row["contender"] for row in result["rows"]} == {"replay-memory", "replay-memory-sse"}
    for row in result["rows"]:
        assert row["connections"] == 20 and row["rss_after_kib"] > 0, row


REDIS_CONTENDERS = {"replay-redis", "broadcaster-redis", "socketio-redis"}


def check_connections(result: dict[str, Any], key: str = "redis_connections") -> None:
    for row in result["rows"]:
        for name in ("redis_connections", "redis_connections_before", "redis_connections_opened"):
            assert isinstance(row[name], int) and row[name] >= 0, row
        if row["contender"] in REDIS_CONTENDERS or row["contender"].startswith("raw-redis"):
            assert row[key] > 0, row
    for entry in result["table"]:
        assert entry["redis_connections"] >= 0 and entry["redis_connections_opened"] >= 0, entry


def test_topics() -> None:
    result = quick("topics", OURS)
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    check_delivery(result, OURS)
    check_ratios(result, "bare")
    for row in result["rows"]:
        assert row["topics"] == row["clients"] > 1 and row["short_clients"] == 0, row
        assert row["server_cpu_us"] >= 0, row
    # the servers hold their Redis connections for the whole run: the sampler sees them
    check_connections(result)
    assert all(entry["cpu_us"] >= 0 for entry in result["table"])


def test_tokens() -> None:
    result = quick("tokens", OURS)
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    assert {(row["contender"], row["streams"]) for row in result["rows"]} == {
        ("replay-redis/token", 3),
        ("replay-redis/coalesce", 3),
    }
    for row in result["rows"]:
        # every token arrives once, in order; the per-token mode sends one event per token
        assert row["tokens"] == row["tokens_expected"] == 3 * 20, row
        assert row["received"] == row["events_expected"] > 0 and row["short_clients"] == 0, row
        assert (row["gaps"], row["duplicates"], row["closes"]) == (0, 0, {}), row
        assert row["latency_ms"]["samples"] == row["tokens"], row
        assert row["token_rate"] > 0 and row["offered_rate"] == 300, row
    (per_token,) = [row for row in result["rows"] if row["contender"] == "replay-redis/token"]
    assert per_token["received"] == per_token["tokens"]
    check_connections(result)
    check_ratios(result, "replay-redis/token")


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed: `make system` installs it")
def test_topics_on_a_cluster_beside_one_redis() -> None:
    contenders = ["bare", "replay-redis", "replay-cluster"]
    result = quick("topics", contenders)
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    check_delivery(result, contenders)
    check_ratios(result, "bare")
    (row,) = [row for row in result["rows"] if row["contender"] == "replay-cluster"]
    # keys per primary (3 topics of 2+ keys each, spread by slot), and the store's connections on them
    assert len(row["shard_keys"]) == 3 and sum(row["shard_keys"]) >= 6, row
    assert row["redis_connections"] > 0, row


def test_publish_topics() -> None:
    result = quick("publish-topics", OURS)
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    names = ("replay-redis", "raw-redis-pool", "raw-redis-pipeline")
    assert {(row["contender"], row["publishers"]) for row in result["rows"]} == {
        (name, n) for name in names for n in (1, 20)
    }
    for row in result["rows"]:
        assert row["events"] == row["topics"] * row["n"] > 0 and row["rate"] > 0, row
    # a quick run can end between two samples: the connections opened are counted exactly
    check_connections(result, "redis_connections_opened")
    check_ratios(result, "raw-redis-pool")
    for entry in result["table"]:
        assert entry["ceiling_ratio"] is not None and entry["ceiling_ratio"] > 0, entry
        if entry["contender"] == "raw-redis-pipeline":
            assert entry["ceiling_ratio"] == 1.0


@pytest.mark.parametrize(("what", "n"), [("frames", 30), ("append", 60), ("append50", 100)])
def test_micro(what: str, n: int) -> None:
    medians = micro.measure(what, n, reps=1)
    assert len(medians) == 2 and all(value > 0 for value in medians.values()), medians


@pytest.mark.parametrize("peer", PEERS)
def test_peer_fanout(peer: str) -> None:
    if not available(peer):
        pytest.skip(f"{peer}: its venv is absent (run bench/setup.sh)")
    result = quick("fanout", [peer])
    check_delivery(result, [peer])


@pytest.mark.parametrize("peer", [name for name in PEERS if name in ("broadcaster-redis", "socketio-redis")])
def test_peer_topics(peer: str) -> None:
    if not available(peer):
        pytest.skip(f"{peer}: its venv is absent (run bench/setup.sh)")
    result = quick("topics", [peer])
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    check_delivery(result, [peer])
    check_connections(result)
