"""RedisStore coalesces concurrent appends to one topic into one script call: what must still hold."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from starlette_replay import StoreUnavailable
from starlette_replay.events import Event
from tests.redis_server import RedisServer, connected

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def script_calls(server: RedisServer) -> int:
    """EVALSHA + EVAL calls the server has run so far."""
    with server.client() as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def items(*pairs: tuple[str, Any]) -> list[tuple[str, str]]:
    return [(event_type, json.dumps(data)) for event_type, data in pairs]


async def test_concurrent_publishers_get_distinct_dense_offsets_matching_the_stream(redis_server: RedisServer) -> None:
    topic = "batch-dense"
    publishers, rounds = 40, 15
    got: dict[int, list[Event]] = {p: [] for p in range(publishers)}
    async with connected(redis_server.url) as (store, sink):
        await store.subscribe(topic)
        calls_before = script_calls(redis_server)

        async def publisher(p: int) -> None:
            for r in range(rounds):
                if r % 5 == 4:  # a publish_many among single publishes: one atomic append of 3
                    batch = items(*((f"many{p}", {"p": p, "r": r, "i": i}) for i in range(3)))
                    events = await store.append(topic, batch)
                    assert [e.offset for e in events] == list(range(events[0].offset, events[0].offset + 3))
                else:
                    events = await store.append(topic, items((f"one{p}", {"p": p, "r": r})))
                got[p].extend(events)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for p in range(publishers):
                    tg.start_soon(publisher, p)
        appends = publishers * rounds
        calls = script_calls(redis_server) - calls_before

        everything = [event for events in got.values() for event in events]
        total = publishers * (rounds + 2 * (rounds // 5))
        assert len(everything) == total
        offsets = sorted(event.offset for event in everything)
        assert offsets == list(range(1, total + 1))  # distinct and dense
        assert len({event.epoch for event in everything}) == 1
        for p, events in got.items():  # each caller's order is kept
            assert [e.offset for e in events] == sorted(e.offset for e in events)
            assert [json.loads(e.raw)["p"] for e in events] == [p] * len(events)
        stored = await store.read(topic, 0, total + 10)
        by_offset = {event.offset: event for event in everything}
        assert [(e.offset, e.epoch, e.event, e.raw, e.time) for e in stored] == [
            (e.offset, e.epoch, e.event, e.raw, e.time) for e in (by_offset[o] for o in range(1, total + 1))
        ]
        await sink.wait_for(lambda: len(sink.of(topic)) >= total)
        assert [e.offset for e in sink.of(topic)] == list(range(1, total + 1))
        assert [e.raw for e in sink.of(topic)] == [e.raw for e in stored]
        assert calls < appends  # coalesced: fewer script calls than appends
        position = await store.position(topic)
        assert position.head == total


async def test_keyed_retries_inside_a_batch_return_the_first_events(redis_server: RedisServer) -> None:
    topic = "batch-keys"
    async with connected(redis_server.url) as (store, _sink):
        first = await store.append(topic, items(("a", 1), ("a", 2)), idempotency_key="k-early")
        results: dict[str, list[Event]] = {}

        async def one(name: str, payload: list[tuple[str, str]], key: str | None) -> None:
            results[name] = await store.append(topic, payload, idempotency_key=key)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(30):
                    # keyed and unkeyed mixed; "k0".."k4" each sent by several publishers at once,
                    # and "k-early" retried: the script sees the repeats within one batch
                    key = None if i % 3 == 0 else f"k{i % 5}"
                    tg.start_soon(one, f"p{i}", items(("b", {"i": i}), ("b", {"i": i, "second": True})), key)
                tg.start_soon(one, "retry-early", items(("a", 1), ("a", 2)), "k-early")

        assert results["retry-early"] == first  # the first events, not new ones
        by_key: dict[str, list[list[Event]]] = {}
        for i in range(30):
            if i % 3:
                by_key.setdefault(f"k{i % 5}", []).append(results[f"p{i}"])
        for key, answers in by_key.items():
            assert all(answer == answers[0] for answer in answers), key  # every retry got the first events
        stored = await store.read(topic, 0, 1000)
        offsets = [e.offset for e in stored]
        assert offsets == list(range(1, len(stored) + 1))
        unkeyed = sum(1 for i in range(30) if i % 3 == 0)
        assert len(stored) == 2 + 2 * unkeyed + 2 * len(by_key)  # each key stored once
        by_offset = {e.offset: e for e in stored}
        for answer in results.values():
            assert [by_offset[e.offset] for e in answer] == answer  # what each caller got is what is stored
            assert answer[1].offset == answer[0].offset + 1  # each append contiguous


async def pause_writes(server: RedisServer, ms: int) -> None:
    with server.client() as client:
        client.execute_command("CLIENT", "PAUSE", ms, "WRITE")


def unpause(server: RedisServer) -> None:
    with server.client() as client:
        client.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize("failure", ["paused", "killed"])
async def test_redis_down_during_a_batch_fails_every_waiter_within_publish_timeout(
    redis_server_factory: Callable[..., RedisServer], failure: str
) -> None:
    server = redis_server_factory()
    topic = "batch-down"
    timeout = 1.0
    async with connected(server.url, publish_timeout=timeout) as (store, _sink):
        await store.append(topic, items(("warm", 0)))  # the script is loaded, a connection pooled
        outcomes: dict[int, tuple[str, float]] = {}

        async def one(i: int) -> None:
            started = time.monotonic()
            try:
                await store.append(topic, items(("x", i)), idempotency_key=f"k{i}" if i % 2 else None)
            except StoreUnavailable:
                outcomes[i] = ("unavailable", time.monotonic() - started)
            else:
                outcomes[i] = ("stored", time.monotonic() - started)

        if failure == "paused":
            await pause_writes(server, 20_000)  # scripts hang: the call in flight never answers
        else:
            server.kill()
        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for i in range(25):
                        tg.start_soon(one, i)
                        if i == 0:
                            await anyio.wait_all_tasks_blocked()  # the first is in flight, the rest queue
        finally:
            if failure == "paused":
                unpause(server)
            else:
                server.start()
        assert len(outcomes) == 25
        assert {kind for kind, _ in outcomes.values()} == {"unavailable"}
        # generous margin over the 1 s bound: CI machines are loaded
        assert max(elapsed for _, elapsed in outcomes.values()) < timeout + 1.5

        # back up: the store works again and the log is consistent (whatever the lost calls did)
        with anyio.fail_after(10):
            while True:
                try:
                    after = await store.append(topic, items(("after", 1)))
                    break
                except StoreUnavailable:
                    await anyio.sleep(0.05)  # Redis restarting: retry pace, not a synchronisation
        stored = await store.read(topic, 0, 1000)
        assert [e.offset for e in stored] == list(range(stored[0].offset, after[0].offset + 1))
        assert stored[-1] == after[0]


async def test_a_cancelled_waiter_loses_no_one_elses_event(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    topic = "batch-cancel"
    async with connected(server.url, publish_timeout=10) as (store, _sink):
        await store.append(topic, items(("warm", 0)))
        results: dict[str, list[Event]] = {}
        cancelled: set[str] = set()

        async def one(name: str, scope: anyio.CancelScope) -> None:
            with scope:
                results[name] = await store.append(topic, items(("x", name)))
            if scope.cancelled_caught:
                cancelled.add(name)

        scopes = {name: anyio.CancelScope() for name in ("a", "b", "c", "d", "e")}
        await pause_writes(server, 20_000)
        try:
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, "a", scopes["a"])
                    await anyio.wait_all_tasks_blocked()  # "a" in flight (Redis paused)
                    for name in ("b", "c", "d", "e"):
                        tg.start_soon(one, name, scopes[name])
                    await anyio.wait_all_tasks_blocked()  # b..e queued behind it
                    scopes["e"].cancel()  # still queued: dropped, never sent
                    scopes["a"].cancel()  # a lone call: gives up; "b" now sends [b, c, d]
                    await anyio.wait_all_tasks_blocked()
                    scopes["b"].cancel()  # the sender of a shared batch: it finishes the batch first
                    await anyio.wait_all_tasks_blocked()
                    unpause(server)
        finally:
            unpause(server)
        assert {"a", "e"} <= cancelled
        # "b" finished its batch under the shield: it returns its events or sees the cancellation afterwards
        assert set(results) - {"b"} == {"c", "d"}
        assert ("b" in results) != ("b" in cancelled)
        stored = await store.read(topic, 0, 100)
        raws = [json.loads(e.raw) for e in stored]
        assert [e.offset for e in stored] == list(range(1, len(stored) + 1))  # dense: nothing corrupted
        assert "e" not in raws  # never sent
        assert "b" in raws  # sent in the shared batch, which its cancelled sender finished
        for name in set(results):
            (event,) = results[name]
            assert stored[event.offset - 1] == event
        assert results["c"][0].offset < results["d"][0].offset  # queue order kept


async def test_a_queued_append_gives_up_when_the_call_in_flight_never_hands_over(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The safety net behind the hand-over: were the call in flight to hang past its
    # own deadline (a bug), an append queued behind it still fails in bounded time,
    # saying nothing was stored, instead of waiting forever.
    timeout = 0.2
    async with connected(redis_server.url, publish_timeout=timeout) as (store, _sink):
        in_flight = anyio.Event()

        async def hang(topic: str, batch: list[Any]) -> None:
            in_flight.set()
            await anyio.sleep_forever()

        monkeypatch.setattr(store._appends, "store_batch", hang)
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.append, "t", items(("first", 1)))
            await in_flight.wait()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="not stored: no turn"):
                await store.append("t", items(("second", 2)))
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
        assert 2 * timeout + 1 - 0.1 <= elapsed < 2 * timeout + 1 + 1.5  # generous: CI machines are loaded
        monkeypatch.undo()
        (event,) = await store.append("t", items(("third", 3)))  # the queue was handed on: appends work
        assert event.offset == 1
