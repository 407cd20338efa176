"""Micro-benchmarks behind "Where the time goes" in docs/benchmarks.md: CPU per
operation inside one process (``time.process_time()``), baseline in the same run.

Usage (from the repository root)::

    .venv/bin/python -m bench.micro append     # sequential RedisStore.append vs redis-py EVALSHA of the same script
    .venv/bin/python -m bench.micro append50   # the same with 50 concurrent callers on one topic
    .venv/bin/python -m bench.micro frames     # the library's per-frame path vs a bare `await ws.send()` loop

``append`` and ``append50`` start their own redis-server (as ``bench.run`` does).
``frames`` delivers to 100 fake sockets whose ``send`` does nothing: it measures
the hub, subscription and connection code per frame, not the ASGI server's send.
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

from bench.run import redis_server
from starlette_replay import MemoryStore, RedisStore, Replay, allow_all
from starlette_replay.stores.redis import _APPEND_BATCH
from tests.helpers import FakeWebSocket, serve_fake


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
    base = f"replay:{{{topic}}}:"
    keys = [base + "meta", base + "log", base + "idem", base + "idemz"]
    sha = await raw.script_load(_APPEND_BATCH)

    async def raw_one(i: int) -> None:
        # the library's append script for one event, as the publish benchmark's raw loop runs it
        await raw.evalsha(sha, 4, *keys, secrets.token_hex(8), 10_000, 0, base + "live", 1, "", 1, "e", _data(i))

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


class _Sink(FakeWebSocket):
    """Records the subscription reply, then drops every frame."""

    quiet = False

    async def send(self, message: dict[str, Any]) -> None:
        if not self.quiet:
            await super().send(message)


async def _frames(n_events: int) -> dict[str, float]:
    sockets = [_Sink() for _ in range(100)]
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=1_000_000)
    async with replay, anyio.create_task_group() as tg:
        for i, ws in enumerate(sockets):
            tg.start_soon(serve_fake, replay, ws, f"c{i}")
            await ws.client_sends({"type": "subscribe", "topic": "t"})
            await ws.wait_for(1)
        for ws in sockets:
            ws.quiet = True
        message = {"type": "websocket.send", "text": "x"}

        async def bare(n: int) -> None:  # one event at a time, as bare broadcasts it
            for _ in range(n):
                for ws in sockets:
                    await ws.send(message)
                await asyncio.sleep(0)

        async def library(n: int) -> None:  # one event per loop turn: every frame is sent inline
            for i in range(n):
                await replay.publish("t", "x", i)
                await asyncio.sleep(0)

        result = {
            "bare await loop": await _cpu_per_op(bare, n_events) / len(sockets),
            "hub + inline send": await _cpu_per_op(library, n_events) / len(sockets),
        }
        tg.cancel_scope.cancel()
    for ws in sockets:
        ws.close_streams()
    return result


def measure(what: str, n: int = 0, reps: int = 3) -> dict[str, float]:
    """Medians over ``reps`` runs, by name; the first name is the baseline."""
    runs: list[dict[str, float]] = []
    if what == "frames":
        for _ in range(reps):
            runs.append(uvloop.run(_frames(n or 3_000)))
    else:
        callers = 50 if what == "append50" else 1
        with tempfile.TemporaryDirectory(prefix="micro-") as tmp, redis_server(Path(tmp)) as url:
            for _ in range(reps):
                runs.append(uvloop.run(_appends(url, n or 20_000, callers)))
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["append", "append50", "frames"])
    parser.add_argument("--n", type=int, default=0, help="operations per measurement")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    medians = measure(args.what, args.n, args.reps)
    unit = "CPU µs per frame" if args.what == "frames" else "CPU µs per append"
    print(f"{args.what}: median of {args.reps}, {unit} (this process only, not Redis)")
    base_name, base = next(iter(medians.items()))
    for name, median in medians.items():
        print(f"  {name:20} {median:8.2f}   {median / base:.2f}x of {base_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
