"""Load and soak: many concurrent WebSocket connections on a real uvicorn server, steady publishing.

Run (from the repository root)::

    .venv/bin/python bench/soak.py --connections 2000 --duration 120
    .venv/bin/python bench/soak.py --connections 300 --duration 5 --json   # the CI size

What it does:

1. starts ``uvicorn soak:make_app --factory`` (this file) on a free port of
   127.0.0.1, one worker, ``MemoryStore(history_size=--history)``;
2. opens ``--connections`` WebSocket clients (in this process, ``websockets``,
   no compression), each subscribed to one of ``--topics`` topics;
3. publishes ``--rate`` events/s round robin over the topics for
   ``--duration`` seconds inside the server (each ``replay.publish`` timed),
   while sampling the server's RSS and ``replay.stats()`` every second;
4. waits until every client has every event of its topic, checking each
   frame on arrival (dense offsets, no duplicate, no unexpected close);
5. closes the clients and checks that the server's counts return to zero;
6. with ``--churn K``: K cycles of every client connecting, subscribing and
   leaving; the counts return to zero after each, and the RSS after the last
   cycle is within the tolerance of the RSS after the second.

Figures: connections held, events published, frames delivered, errors, gaps,
duplicates, publish latency (p50/p99/max of ``await replay.publish``),
delivery latency (event ``time`` to the client's receipt), and memory: the mean
RSS of the second half of the measuring window against the first half (the
window starts once the topics' histories are full, plus 5 s). The run passes
when nothing was lost, duplicated or closed, every count returned to zero, and
the second half's mean RSS is within ``--memory-tolerance`` (default 5 %) +
2 MiB of the first half's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# --- the server side (imported by uvicorn in the server process) ---------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_app() -> Any:
    """The soak server: a Replay route plus ``/health``, ``/stats`` and ``/publish``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from starlette_replay import MemoryStore, Replay, allow_all

    history = int(os.environ.get("SOAK_HISTORY", "20"))
    replay = Replay(MemoryStore(history_size=history), authorize=allow_all)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({**replay.stats(), "rss": _rss_bytes(), "tasks": len(asyncio.all_tasks())})

    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        topics: list[str] = body["topics"]
        rate: float = body["rate"]
        duration: float = body["duration"]
        latencies: list[float] = []
        last: dict[str, int] = {}
        started = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - started < duration:
            due = started + n / rate
            if due > now:
                await asyncio.sleep(due - now)  # the pace of the publisher, not a synchronisation
            topic = topics[n % len(topics)]
            before = time.perf_counter()
            event = await replay.publish(topic, "tick", {"n": n})
            latencies.append(time.perf_counter() - before)
            last[topic] = event.offset
            n += 1
        return JSONResponse({"published": n, "last": last, "latency": _percentiles(latencies)})

    return Starlette(
        routes=[
            replay.route("/ws"),
            Route("/health", health),
            Route("/stats", stats),
            Route("/publish", publish, methods=["POST"]),
        ],
        lifespan=replay.lifespan,
    )


def _percentiles(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "count": 0}
    ordered = sorted(seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {
        "p50_ms": round(pick(0.5), 3),
        "p99_ms": round(pick(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "count": len(ordered),
    }


# --- the runner ------------------------------------------------------------------------------


@dataclass
class Figures:
    connections_requested: int = 0
    connections_held: int = 0
    published: int = 0
    delivered: int = 0
    gaps: int = 0
    duplicates: int = 0
    unexpected_closes: int = 0
    errors: list[str] = field(default_factory=list)
    publish_latency: dict[str, float] = field(default_factory=dict)
    delivery_latency: dict[str, float] = field(default_factory=dict)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    stats_after: dict[str, int] = field(default_factory=dict)
    churn_rss_mib: list[float] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = False


async def _settled(port: int) -> dict[str, int]:
    """The server's stats once its connection count is back to zero (or after 10 s)."""
    for _ in range(100):  # the server notices closes asynchronously; polling another process
        stats: dict[str, int] = await asyncio.to_thread(_get, port, "/stats")
        if stats["connections"] == 0:
            break
        await asyncio.sleep(0.1)
    return stats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(port: int, path: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def _post(port: int, path: str, body: Any, timeout: float) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def start_server(port: int, history: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SOAK_HISTORY": str(history), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "uvicorn", "soak:make_app", "--factory", "--app-dir", str(HERE),
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
        "--backlog", "4096",
    ]  # fmt: skip
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the soak server exited with {process.returncode}; see {log_path}")
        try:
            if _get(port, "/health", timeout=1.0)["pid"] == process.pid:
                return process
        except OSError:
            pass
        time.sleep(0.1)  # polling a starting process: there is no event to wait on
    process.kill()
    raise RuntimeError(f"the soak server did not start; see {log_path}")


class Client:
    """One subscriber: checks dense offsets and records delivery latencies."""

    def __init__(self, index: int, topic: str, figures: Figures, latencies: list[float]) -> None:
        self.index = index
        self.topic = topic
        self.figures = figures
        self.latencies = latencies
        self.next_offset: int | None = None
        self.last_seen = 0
        self.ready = asyncio.Event()
        self.progress = asyncio.Event()
        self.ws: Any = None

    async def run(self, url: str) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        try:
            async with connect(
                url,
                subprotocols=["replay.v1"],
                compression=None,
                ping_interval=None,
                open_timeout=60,  # type: ignore[list-item]
            ) as ws:
                self.ws = ws
                await ws.send(json.dumps({"type": "subscribe", "topic": self.topic}))
                async for message in ws:
                    frame = json.loads(message)
                    kind = frame["type"]
                    if kind == "subscribed":
                        self.next_offset = frame["offset"] - frame["replayed"] + 1
                        self.ready.set()
                    elif kind == "event":
                        self._event(frame)
                    elif kind != "ping":
                        self.figures.errors.append(f"client {self.index}: unexpected {frame}")
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != 1000:
                self.figures.unexpected_closes += 1
                self.figures.errors.append(f"client {self.index}: closed {exc!r}")
        except Exception as exc:  # a failed connect
            self.figures.errors.append(f"client {self.index}: {exc!r}")
        finally:
            self.ready.set()
            self.progress.set()

    def _event(self, frame: dict[str, Any]) -> None:
        offset = frame["offset"]
        if self.next_offset is None or offset > self.next_offset:
            self.figures.gaps += 1
        elif offset < self.next_offset:
            self.figures.duplicates += 1
            return
        self.next_offset = offset + 1
        self.last_seen = offset
        self.figures.delivered += 1
        self.latencies.append(time.time() - frame["time"] / 1000)
        self.progress.set()


async def soak(
    connections: int,
    duration: float,
    *,
    topics: int = 100,
    rate: float = 100.0,
    history: int = 20,
    memory_tolerance: float = 0.05,
    check_memory: bool = True,
    churn: int = 0,
    log_path: Path | None = None,
) -> Figures:
    """Run one soak and return its figures (``figures.ok`` tells whether it passed)."""
    figures = Figures(connections_requested=connections)
    port = _free_port()
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{port}.log"
    started = time.monotonic()
    server = await asyncio.to_thread(start_server, port, history, log_path)
    names = [f"soak:{i}" for i in range(topics)]
    latencies: list[float] = []
    clients = [Client(i, names[i % topics], figures, latencies) for i in range(connections)]
    tasks: list[asyncio.Task[None]] = []
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        for batch in range(0, connections, 100):
            group = clients[batch : batch + 100]
            tasks += [asyncio.create_task(client.run(url)) for client in group]
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in group)), 60)
        stats = await asyncio.to_thread(_get, port, "/stats")
        figures.connections_held = stats["connections"]

        warmup = history * topics / rate + 5 if check_memory else 0.0
        sampling = True

        async def sample() -> None:
            t0 = time.monotonic()
            while sampling:
                stats = await asyncio.to_thread(_get, port, "/stats")
                figures.rss_samples.append((time.monotonic() - t0, stats["rss"]))
                await asyncio.sleep(1.0)  # the sampling period

        sampler = asyncio.create_task(sample())
        result = await asyncio.to_thread(
            _post, port, "/publish", {"topics": names, "rate": rate, "duration": duration}, duration + 60
        )
        sampling = False
        await sampler
        figures.published = result["published"]
        figures.publish_latency = result["latency"]
        last: dict[str, int] = result["last"]

        async def caught_up(client: Client) -> None:
            target = last.get(client.topic, 0)
            while client.last_seen < target and not tasks[client.index].done():
                client.progress.clear()
                await client.progress.wait()

        try:
            await asyncio.wait_for(asyncio.gather(*(caught_up(c) for c in clients)), 60)
        except TimeoutError:
            behind = sum(1 for c in clients if c.last_seen < last.get(c.topic, 0))
            figures.errors.append(f"{behind} clients did not receive every event within 60 s")
        figures.delivery_latency = _percentiles(latencies)

        for client in clients:
            if client.ws is not None:
                await client.ws.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        figures.stats_after = await _settled(port)
        for cycle in range(churn):
            # Churn at full size: every client connects, subscribes and leaves again.
            group = [Client(i, names[i % topics], figures, []) for i in range(connections)]
            runs = []
            for batch in range(0, connections, 100):
                runs += [asyncio.create_task(c.run(url)) for c in group[batch : batch + 100]]
                await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in group[batch : batch + 100])), 60)
            for client in group:
                if client.ws is not None:
                    await client.ws.close()
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 60)
            after = await _settled(port)
            figures.churn_rss_mib.append(round(after["rss"] / 2**20, 1))
            leftover = {k: after[k] for k in ("connections", "subscriptions", "topics", "queued_frames") if after[k]}
            if leftover:
                figures.errors.append(f"churn cycle {cycle + 1}: counts did not return to zero: {leftover}")
    finally:
        for task in tasks:
            task.cancel()
        server.terminate()
        try:
            await asyncio.to_thread(server.wait, 10)
        except subprocess.TimeoutExpired:
            server.kill()
    figures.seconds = round(time.monotonic() - started, 1)
    expected_deliveries = sum(last.get(c.topic, 0) for c in clients)  # each client starts at offset 1
    if figures.delivered != expected_deliveries:
        figures.errors.append(f"delivered {figures.delivered} frames, expected {expected_deliveries}")
    window = [rss for t, rss in figures.rss_samples if t >= warmup]
    if check_memory and len(window) >= 4:
        half = len(window) // 2
        first, second = statistics.mean(window[:half]), statistics.mean(window[half:])
        growth = second / first - 1
        figures.memory = {
            "first_half_mib": round(first / 2**20, 1),
            "second_half_mib": round(second / 2**20, 1),
            "growth_pct": round(growth * 100, 2),
            "tolerance_pct": memory_tolerance * 100,
            "samples": len(window),
            "warmup_s": round(warmup, 1),
        }
        if second > first * (1 + memory_tolerance) + 2 * 2**20:
            figures.errors.append(f"memory grew {growth:.1%} between the halves (tolerance {memory_tolerance:.0%})")
    elif check_memory:
        figures.errors.append("too few memory samples after the warm-up: run longer")
    if len(figures.churn_rss_mib) >= 3:
        # After the first cycles have sized the allocator's pools, churn must not add memory.
        base, last_rss = figures.churn_rss_mib[1], figures.churn_rss_mib[-1]
        if last_rss > base * (1 + memory_tolerance) + 2:
            figures.errors.append(f"memory grew over churn cycles: {figures.churn_rss_mib} MiB")
    leftover = {
        k: v
        for k, v in figures.stats_after.items()
        if k in ("connections", "subscriptions", "topics", "queued_frames") and v
    }
    if leftover:
        figures.errors.append(f"counts did not return to zero: {leftover}")
    if figures.connections_held != connections:
        figures.errors.append(f"held {figures.connections_held} of {connections} connections")
    figures.ok = not figures.errors and not figures.gaps and not figures.duplicates and not figures.unexpected_closes
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of publishing")
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second, all topics together")
    parser.add_argument("--history", type=int, default=20, help="the store's history_size per topic")
    parser.add_argument("--memory-tolerance", type=float, default=0.05)
    parser.add_argument("--no-memory-check", action="store_true", help="for short runs")
    parser.add_argument("--churn", type=int, default=0, help="afterwards, cycles of all clients connecting and leaving")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = asyncio.run(
        soak(
            args.connections,
            args.duration,
            topics=args.topics,
            rate=args.rate,
            history=args.history,
            memory_tolerance=args.memory_tolerance,
            check_memory=not args.no_memory_check,
            churn=args.churn,
        )
    )
    report = {k: v for k, v in figures.__dict__.items() if k != "rss_samples"}
    report["rss_mib"] = [round(rss / 2**20, 1) for _, rss in figures.rss_samples]
    report["errors"] = figures.errors[:20]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
