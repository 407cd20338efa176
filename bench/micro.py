"""Micro-benchmarks behind "Where the time goes" in docs/benchmarks.md: CPU per
operation inside one process (``time.process_time()``), baseline in the same run.

Usage (from the repository root)::

    .venv/bin/python -m bench.micro append     # sequential RedisStore.append vs redis-py EVALSHA of the same script
    .venv/bin/python -m bench.micro append50   # the same with 50 concurrent callers on one topic
    .venv/bin/python -m bench.micro frames     # the library's per-frame path vs a bare `await ws.send_text()` loop
    .venv/bin/python -m bench.micro repair     # wall time: subscribe 1,000 topics; resubscribe and repair them all

``append``, ``append50`` and ``repair`` start their own redis-server (as ``bench.run`` does).
``repair`` is wall time, not CPU: how long one process takes to subscribe
``--n`` topics (default 1,000), and, after its pub/sub connection is killed
with one event published to every topic meanwhile, to reconnect, resubscribe
and deliver every missed event from the streams.
``frames`` delivers to 100 connections of the library's endpoint and 100 bare
Starlette WebSockets whose ASGI ``send`` only counts: it measures the code above
the ASGI server's send (the hub, subscription and connection against a bare
``send_text`` loop), not the send itself.
Options: ``--n`` operations per measurement, ``--reps``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import uvloop
from starlette.websockets import WebSocket

from bench._script import append_call, append_script
from bench.run import redis_server
from starlette_replay import MemoryStore, RedisStore, Replay, allow_all


def _data(i: int) -> str:
    return json.dumps({"s": i, "t": time.monotonic_ns(), "p": "x" * 120}, separators=(",", ":"))


async def _cpu_per_op(run: Callable[[int], Awaitable[None]], n: int) -> float:
    """CPU µs per operation of ``run(n)`` (after a warm-up)."""
    await run(max(1, n // 20))
    start = time.process_time()
    await run(n)
    return (time.process_time() - start) / n * 1e6


async def _appends(url: str, n: int, callers: int) -> dict[str, float]:
    import redis.asyncio

    raw = redis.asyncio.Redis.from_url(url)
    store = RedisStore.from_url(url)
    topic = "m-" + secrets.token_hex(4)
    sha = await raw.script_load(append_script())

    async def raw_one(i: int) -> None:
        # the library's append script for one event, as the publish benchmark's raw loop runs it
        await raw.evalsha(sha, *append_call(topic, "e", _data(i)))

    async def lib_one(i: int) -> None:
        await store.append(topic, [("e", _data(i))])

    def spread(one: Callable[[int], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
        async def run(total: int) -> None:
            async def caller(c: int) -> None:
                for i in range(total // callers):
                    await one(i)

            await asyncio.gather(*(caller(c) for c in range(callers)))

        return run

    try:
        return {
            "raw-redis-py": await _cpu_per_op(spread(raw_one), n),
            "RedisStore.append": await _cpu_per_op(spread(lib_one), n),
        }
    finally:
        await store.aclose()
        await raw.aclose()


class _Peer:
    """The ASGI side of one WebSocket with no socket behind it: ``send`` only counts.

    The server's own send (uvicorn's framing and write) is left out on purpose:
    what is measured is the code above it, the library's or a bare loop's.
    """

    def __init__(self) -> None:
        self.inbox_send, self.inbox = anyio.create_memory_object_stream[dict[str, Any]](10)
        self.sent = 0
        self._wanted, self._reached = 0, anyio.Event()
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench")],
            "server": ("bench", 80),
            "client": ("127.0.0.1", 1),
            "subprotocols": [],
            "extensions": {},
        }

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.receive()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent += 1
        if self.sent == self._wanted:
            self._reached.set()

    async def sent_at_least(self, n: int) -> None:
        self._wanted, self._reached = n, anyio.Event()
        if self.sent < n:
            await self._reached.wait()


async def _frames(n_events: int) -> dict[str, float]:
    """Per frame, to 100 connections: the library (its endpoint, over Starlette's
    WebSocket) against a bare loop of ``await websocket.send_text(frame)``, as
    bench/servers/bare.py sends."""
    peers = [_Peer() for _ in range(100)]
    bare_peers = [_Peer() for _ in range(100)]
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=1_000_000)
    async with replay, anyio.create_task_group() as tg:
        for peer in peers:
            tg.start_soon(replay.endpoint, WebSocket(peer.scope, peer.receive, peer.send))
            await peer.inbox_send.send({"type": "websocket.connect"})
            await peer.inbox_send.send({"type": "websocket.receive", "text": '{"type":"subscribe","topic":"t"}'})
            await peer.sent_at_least(2)  # accept, subscribed
        sockets = []
        for peer in bare_peers:
            websocket = WebSocket(peer.scope, peer.receive, peer.send)
            await peer.inbox_send.send({"type": "websocket.connect"})
            await websocket.accept()
            sockets.append(websocket)
        frame = json.dumps({"type": "event", "topic": "t", "offset": 1, "event": "x", "data": 1, "time": 0})

        async def bare(n: int) -> None:  # one event at a time, as bare broadcasts it
            for _ in range(n):
                for websocket in sockets:
                    await websocket.send_text(frame)
                await asyncio.sleep(0)

        async def library(n: int) -> None:  # one event per loop turn: every frame is sent inline
            for i in range(n):
                await replay.publish("t", "x", i)
                await asyncio.sleep(0)

        result = {
            "bare send_text loop": await _cpu_per_op(bare, n_events) / len(sockets),
            "hub + inline send": await _cpu_per_op(library, n_events) / len(peers),
        }
        expected = 2 + n_events + max(1, n_events // 20)
        if any(peer.sent != expected for peer in peers):
            raise RuntimeError(f"not every frame reached every peer: {sorted({p.sent for p in peers})} != {expected}")
        tg.cancel_scope.cancel()
    for peer in peers + bare_peers:
        peer.inbox_send.close()
        peer.inbox.close()
    return result


class _Sink:
    def __init__(self) -> None:
        self.count = 0
        self.resets = 0
        self.changed = asyncio.Event()

    def deliver(self, event: Any) -> None:
        self.count += 1
        self.changed.set()

    def reset(self, topic: str, reason: str) -> None:
        self.resets += 1


async def _wait(sink: _Sink, count: int) -> None:
    async with asyncio.timeout(60):
        while sink.count < count:
            sink.changed.clear()
            await sink.changed.wait()


async def _repair(url: str, n: int) -> dict[str, float]:
    import redis.asyncio

    store = RedisStore.from_url(url, prefix="m" + secrets.token_hex(4))
    sink = _Sink()
    raw = redis.asyncio.Redis.from_url(url)
    topics = [f"r{i}" for i in range(n)]
    async with store.connect(sink):
        started = time.perf_counter()
        await asyncio.gather(*(store.subscribe(topic) for topic in topics))
        subscribed = time.perf_counter() - started
        await asyncio.gather(*(store.append(topic, [("e", _data(0))]) for topic in topics))
        await _wait(sink, n)
        reconnects = store.reconnects
        started = time.perf_counter()
        await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await asyncio.gather(*(store.append(topic, [("e", _data(1))]) for topic in topics))
        await _wait(sink, 2 * n)
        repaired = time.perf_counter() - started
        if store.reconnects != reconnects + 1 or sink.resets:
            raise RuntimeError(f"expected one reconnect and no reset: {store.reconnects - reconnects}, {sink.resets}")
    await raw.aclose()
    await store.aclose()
    return {f"subscribe {n} topics (ms)": subscribed * 1000, "kill -> all repaired (ms)": repaired * 1000}


def measure(what: str, n: int = 0, reps: int = 3) -> dict[str, float]:
    """Medians over ``reps`` runs, by name; the first name is the baseline."""
    runs: list[dict[str, float]] = []
    if what == "frames":
        for _ in range(reps):
            runs.append(uvloop.run(_frames(n or 3_000)))
    elif what == "repair":
        with tempfile.TemporaryDirectory(prefix="micro-") as tmp, redis_server(Path(tmp)) as url:
            for _ in range(reps):
                runs.append(uvloop.run(_repair(url, n or 1_000)))
    else:
        callers = 50 if what == "append50" else 1
        with tempfile.TemporaryDirectory(prefix="micro-") as tmp, redis_server(Path(tmp)) as url:
            for _ in range(reps):
                runs.append(uvloop.run(_appends(url, n or 20_000, callers)))
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["append", "append50", "frames", "repair"])
    parser.add_argument("--n", type=int, default=0, help="operations per measurement")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    medians = measure(args.what, args.n, args.reps)
    if args.what == "repair":
        print(f"repair: median of {args.reps}, wall time (one process, its own redis-server)")
        for name, median in medians.items():
            print(f"  {name:28} {median:8.1f}")
        return 0
    unit = "CPU µs per frame" if args.what == "frames" else "CPU µs per append"
    print(f"{args.what}: median of {args.reps}, {unit} (this process only, not Redis)")
    base_name, base = next(iter(medians.items()))
    for name, median in medians.items():
        print(f"  {name:20} {median:8.2f}   {median / base:.2f}x of {base_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
