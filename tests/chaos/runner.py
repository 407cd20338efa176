"""Chaos runner: 2 uvicorn workers on one Redis, many clients, a steady publisher, random faults.

Long run (documented in docs/reliability.md)::

    .venv/bin/python -m tests.chaos.runner --duration 300 --seed 12345

Setup: its own ``redis-server`` (AOF on, ``appendfsync always``,
``noeviction``) on a free port in a temporary directory; two uvicorn workers
(``tests.e2e.apps:make_app`` with ``REPLAY_STORE=redis``) on free ports; a
publisher (a route-less ``Replay`` on its own ``RedisStore`` in this process)
publishing round robin to ``--topics`` topics, each publish with an
idempotency key and retried until it is acknowledged; ``--clients`` clients,
each on 2 topics, that connect to either worker at random.

Chaos, all drawn from one seed that is printed first:

- clients drop their socket at random (a clean close or a TCP abort) and
  reconnect to either worker, resuming from their cursor;
- faults every 1.5-4 s: SIGKILL a worker and start it again; SIGKILL Redis
  and start it again 0.5-7 s later (from its AOF); ``CLIENT KILL TYPE pubsub`` (the workers' live
  listener); pause a client for 2-5 s while 300 events of 1 kB arrive at
  once on one of its topics (a slow consumer: closed with 1013 past the send
  queue of 64, then it resumes).

At the end the publisher stops, every client catches up to each topic's head,
and every client's raw log (each subscription's ``subscribed`` frame and the
offsets of the events that followed, before any dedup) is checked against the
stream read back from Redis:

- lost: an offset of the stream that the client never received;
- duplicated: an offset received twice within one subscription;
- out of order: an event not exactly one after the previous one in its subscription
  (a gap inside a subscription counts here too);
- ``recovered: false``: a resumed subscription that could not be recovered;
- wrong data or epoch: an event whose payload differs from the stream's.

Required: all zero. Every acknowledged publish must also be in the stream,
once (no acknowledged write lost, no publish stored twice), and no worker
logs a traceback (ERROR lines are counted and reported).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from starlette_replay import Event, RedisStore, Replay, ReplayError
from tests.e2e.client import open_socket
from tests.redis_server import RedisServer
from tests.servers import UvicornServer

__all__ = ["ChaosReport", "run_chaos"]

FAULTS = ("kill_worker", "restart_redis", "kill_listener", "pause_client")
BURST = 300  # large events published at once to a paused client's topic


@dataclass
class Sub:
    """One subscription as the client saw it: the ``subscribed`` frame, then event offsets."""

    server: str
    epoch: str
    head: int
    replayed: int
    resumed: bool
    recovered: bool
    offsets: list[int] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)


@dataclass
class ChaosReport:
    seed: int
    duration: float
    clients: int
    topics: int
    faults: Counter[str] = field(default_factory=Counter)
    drops: int = 0
    sessions: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    refused_subscribes: int = 0
    published: int = 0
    publish_retries: int = 0
    events_checked: int = 0
    subscriptions: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    not_recovered: int = 0
    wrong_data: int = 0
    acked_missing: int = 0
    stored_twice: int = 0
    caught_up: bool = False
    server_tracebacks: int = 0
    server_error_lines: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.caught_up and not any(
            (
                self.lost,
                self.duplicated,
                self.out_of_order,
                self.not_recovered,
                self.wrong_data,
                self.acked_missing,
                self.stored_twice,
                self.server_tracebacks,
            )
        )

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "problems"}
        out["faults"] = dict(self.faults)
        out["close_codes"] = dict(self.close_codes)
        out["problems"] = self.problems[:20]
        out["ok"] = self.ok
        return out


class _Resubscribe(Exception):
    """The server refused a subscribe (the store was unreachable): reconnect."""


class ChaosClient:
    """A client on a few topics that reconnects to random workers and logs every raw frame."""

    def __init__(self, index: int, topics: list[str], rng: random.Random, report: ChaosReport) -> None:
        self.index = index
        self.topics = topics
        self.rng = rng
        self.report = report
        self.cursors: dict[str, tuple[str, int] | None] = dict.fromkeys(topics)
        self.log: dict[str, list[Sub]] = {topic: [] for topic in topics}
        self.current: dict[str, Sub] = {}
        self.pause_for = 0.0
        self.draining = False
        self.targets: dict[str, int] = {}
        self.done = anyio.Event()
        self.ws: ClientConnection | None = None

    def pause(self, seconds: float) -> None:
        self.pause_for = seconds

    def _reached(self) -> bool:
        return bool(self.targets) and all(
            (cursor := self.cursors[t]) is not None and cursor[1] >= self.targets[t] for t in self.topics
        )

    async def run(self, servers: list[UvicornServer], stop: anyio.Event) -> None:
        while not self.done.is_set():
            server = self.rng.choice(servers)
            try:
                await self._session(server, stop)
            except (OSError, TimeoutError, InvalidHandshake, InvalidStatus, _Resubscribe):
                pass  # the worker is down or restarting, or the store was: try again, maybe the other
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
                self.report.close_codes[str(code)] += 1
            finally:
                self.ws = None
                self.current.clear()
            if self._reached() and self.draining:
                self.done.set()
                return
            await anyio.sleep(self.rng.uniform(0.02, 0.3))  # reconnect backoff (chaos pacing)

    async def _session(self, server: UvicornServer, stop: anyio.Event) -> None:
        # A small receive buffer: a client that stops reading soon holds up the server's writer.
        # websockets' own max_size and close_timeout, as this runner always had.
        ws = await open_socket(server.ws_url(), rcvbuf=8192, max_queue=4, max_size=2**20, close_timeout=10)
        async with ws:
            self.ws = ws
            self.report.sessions += 1
            for topic in self.topics:
                frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
                cursor = self.cursors[topic]
                if cursor is None:
                    frame["rewind"] = 2**53 - 1  # from the first event: the whole stream is checked
                else:
                    frame["epoch"], frame["offset"] = cursor
                await ws.send(json.dumps(frame))
            drop_at = time.monotonic() + self.rng.uniform(0.5, 6.0)
            while True:
                if self.pause_for:
                    seconds, self.pause_for = self.pause_for, 0.0
                    await anyio.sleep(seconds)  # the injected fault: a consumer that stops reading
                if not self.draining and time.monotonic() > drop_at:
                    self.report.drops += 1
                    if self.rng.random() < 0.5:
                        ws.transport.abort()  # a TCP reset: no close frame
                    else:
                        await ws.close()
                    return
                if self.draining and self._reached():
                    await ws.close()
                    self.done.set()
                    return
                with anyio.move_on_after(0.5):
                    message = await ws.recv()
                    self._frame(server.name, json.loads(message))

    def _frame(self, server: str, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "subscribed":
            sub = Sub(server, frame["epoch"], frame["offset"], frame["replayed"], frame["resumed"], frame["recovered"])
            self.log[frame["topic"]].append(sub)
            self.current[frame["topic"]] = sub
            if not frame["replayed"] and (self.cursors[frame["topic"]] is None or not frame["recovered"]):
                self.cursors[frame["topic"]] = (frame["epoch"], frame["offset"])
        elif kind == "event":
            topic = frame["topic"]
            sub = self.current.get(topic)
            if sub is None:
                self.report.problems.append(f"client {self.index}: event before subscribed: {frame}")
                return
            sub.offsets.append(frame["offset"])
            sub.data.append(frame["data"])
            cursor = self.cursors[topic]
            if cursor is None or frame["offset"] == cursor[1] + 1 or sub.epoch != cursor[0]:
                self.cursors[topic] = (sub.epoch, frame["offset"])
        elif kind == "error":
            # e.g. "unavailable" while Redis restarts: reconnect and subscribe again
            self.report.refused_subscribes += 1
            raise _Resubscribe(frame.get("code", ""))


async def publisher(
    url: str,
    topics: list[str],
    rate: float,
    stop: anyio.Event,
    report: ChaosReport,
    acked: list[tuple[str, int, int]],
    done: anyio.Event,
    bursts: list[str],
) -> None:
    """Publish round robin until ``stop``; each publish retried under one idempotency key until acknowledged.

    A topic put in ``bursts`` gets ``BURST`` large events at once (one ``publish_many``).
    """
    async with Replay(RedisStore.from_url(url, prefix="chaos", publish_timeout=2.0)) as replay:
        k = n = 0
        started = time.monotonic()
        while not stop.is_set():
            if bursts:
                topic = bursts.pop()
                items = [("burst", {"k": k + j, "pad": "x" * 1000}) for j in range(BURST)]
                burst = functools.partial(replay.publish_many, topic, items, idempotency_key=f"b{k}")
                events = await _retried(report, burst)
                acked += [(topic, event.offset, k + j) for j, event in enumerate(events)]
                report.published += BURST
                k += BURST
                continue
            due = started + n / rate
            if due > time.monotonic():
                await anyio.sleep(due - time.monotonic())  # the publishing pace
            topic = topics[n % len(topics)]
            one = functools.partial(replay.publish_many, topic, [("tick", {"k": k})], idempotency_key=f"k{k}")
            (event,) = await _retried(report, one)
            acked.append((topic, event.offset, k))
            report.published += 1
            k += 1
            n += 1
    done.set()


async def _retried(report: ChaosReport, publish: Callable[[], Awaitable[list[Event]]]) -> list[Event]:
    while True:
        try:
            return await publish()
        except ReplayError:
            report.publish_retries += 1
            await anyio.sleep(0.1)  # Redis is down: retry under the same idempotency key


async def faults(
    rng: random.Random,
    redis_server: RedisServer,
    workers: list[UvicornServer],
    clients: list[ChaosClient],
    stop: anyio.Event,
    report: ChaosReport,
    done: anyio.Event,
    bursts: list[str],
) -> None:
    t0 = time.monotonic()
    first = rng.sample(FAULTS, len(FAULTS))
    while not stop.is_set():
        with anyio.move_on_after(rng.uniform(1.5, 4.0)):
            await stop.wait()
        if stop.is_set():
            break
        # Each kind once first (in a random order), so that even a short run has them all.
        fault = first.pop() if first else rng.choice(FAULTS)
        report.faults[fault] += 1
        print(f"  t={time.monotonic() - t0:6.1f}s fault: {fault}", flush=True)
        if fault == "kill_worker":
            worker = rng.choice(workers)
            await anyio.to_thread.run_sync(functools.partial(worker.restart, kill=True, timeout=30))
        elif fault == "restart_redis":
            # Down for a while (publishes fail and are retried, subscribes are
            # refused, listeners reconnect), then back from its AOF.
            await anyio.to_thread.run_sync(redis_server.kill)
            await anyio.sleep(rng.uniform(0.5, 7.0))  # the outage: some outlast publish_timeout (5 s)
            await anyio.to_thread.run_sync(redis_server.start)
        elif fault == "kill_listener":
            await anyio.to_thread.run_sync(redis_server.kill_pubsub_clients)
        else:
            # A slow consumer: it stops reading while a burst of large events
            # arrives on one of its topics (its small receive buffer fills,
            # then the server's send queue: 1013, and it resumes).
            client = rng.choice(clients)
            client.pause(rng.uniform(2.0, 5.0))
            bursts.append(rng.choice(client.topics))
    done.set()


def check(
    clients: list[ChaosClient],
    stream: dict[str, list[Any]],
    epochs: dict[str, str],
    acked: list[tuple[str, int, int]],
    report: ChaosReport,
) -> None:
    """Count lost, duplicated, out-of-order, not-recovered and wrong events against the stream."""
    for events in stream.values():
        ks = [e["k"] for e in events]
        report.stored_twice += len(ks) - len(set(ks))
    for topic, offset, k in acked:
        events = stream[topic]
        if not (0 < offset <= len(events)) or events[offset - 1]["k"] != k:
            report.acked_missing += 1
            report.problems.append(f"acknowledged {topic}@{offset} (k={k}) is not in the stream")
    for client in clients:
        for topic, subs in client.log.items():
            events = stream[topic]
            received: set[int] = set()
            for sub in subs:
                report.subscriptions += 1
                if sub.resumed and not sub.recovered:
                    report.not_recovered += 1
                    report.problems.append(f"client {client.index} {topic}: recovered false on {sub.server}")
                if sub.epoch != epochs[topic]:
                    report.wrong_data += 1
                    report.problems.append(f"client {client.index} {topic}: epoch {sub.epoch} != {epochs[topic]}")
                expected = sub.head - sub.replayed + 1
                seen: set[int] = set()
                for offset, data in zip(sub.offsets, sub.data, strict=True):
                    report.events_checked += 1
                    if offset in seen:
                        report.duplicated += 1
                        report.problems.append(f"client {client.index} {topic}: duplicate {offset} ({sub.server})")
                    elif offset != expected:
                        report.out_of_order += 1
                        report.problems.append(
                            f"client {client.index} {topic}: got {offset}, expected {expected} ({sub.server})"
                        )
                    seen.add(offset)
                    expected = offset + 1
                    if not (0 < offset <= len(events)) or events[offset - 1] != data:
                        report.wrong_data += 1
                        report.problems.append(f"client {client.index} {topic}@{offset}: data {data}")
                received |= seen
            missing = set(range(1, len(events) + 1)) - received
            if missing:
                report.lost += len(missing)
                report.problems.append(f"client {client.index} {topic}: lost {sorted(missing)[:10]}")


async def run_chaos(
    duration: float,
    seed: int,
    *,
    clients: int = 50,
    topics: int = 10,
    rate: float = 30.0,
    workdir: Path | None = None,
) -> ChaosReport:
    """Run the chaos for ``duration`` seconds of faults, then check. Returns the report."""
    started = time.monotonic()
    report = ChaosReport(seed=seed, duration=duration, clients=clients, topics=topics)
    print(f"chaos: seed={seed} duration={duration}s clients={clients} topics={topics}", flush=True)
    rng = random.Random(seed)
    own_dir = None
    if workdir is None:
        own_dir = tempfile.TemporaryDirectory(prefix="chaos-")
        workdir = Path(own_dir.name)
    redis_server = RedisServer(workdir / "redis")
    workers: list[UvicornServer] = []
    try:
        await anyio.to_thread.run_sync(redis_server.start)
        env = {
            "REPLAY_STORE": "redis",
            "REPLAY_REDIS_URL": redis_server.url,
            "REPLAY_REDIS_PREFIX": "chaos",
            "REPLAY_HISTORY_SIZE": 10_000_000,  # nothing is trimmed
            "REPLAY_SEND_QUEUE_SIZE": 64,  # a paused client is closed with 1013 soon
            "REPLAY_HEARTBEAT": 5,
            "REPLAY_LOG_LEVEL": "WARNING",
        }
        for name in ("worker-a", "worker-b"):
            worker = UvicornServer(workdir / f"{name}.log", env=env, name=name, allow_errors=True)
            workers.append(worker)
            await anyio.to_thread.run_sync(worker.start)
        names = [f"chaos:{i}" for i in range(topics)]
        chaos_clients = [
            ChaosClient(i, [names[i % topics], names[(i + 3) % topics]], random.Random(rng.random()), report)
            for i in range(clients)
        ]
        acked: list[tuple[str, int, int]] = []
        stop_faults, stop_publisher, stop_clients = anyio.Event(), anyio.Event(), anyio.Event()
        faults_done, publisher_done = anyio.Event(), anyio.Event()
        bursts: list[str] = []
        async with anyio.create_task_group() as tg:
            for client in chaos_clients:
                tg.start_soon(client.run, workers, stop_clients)
            tg.start_soon(
                publisher, redis_server.url, names, rate, stop_publisher, report, acked, publisher_done, bursts
            )
            fault_rng = random.Random(rng.random())
            tg.start_soon(
                faults, fault_rng, redis_server, workers, chaos_clients, stop_faults, report, faults_done, bursts
            )
            await anyio.sleep(duration)  # the length of the run
            stop_faults.set()
            stop_publisher.set()
            with anyio.fail_after(120):  # a fault in progress finishes (a restart), the last publish lands
                await faults_done.wait()
                await publisher_done.wait()
            async with Replay(RedisStore.from_url(redis_server.url, prefix="chaos")) as reader:
                heads = {topic: (await reader.position(topic)).head for topic in names}
            for client in chaos_clients:
                client.targets = {t: heads[t] for t in client.topics}
                client.draining = True
            with anyio.move_on_after(max(60.0, duration)):
                for client in chaos_clients:
                    await client.done.wait()
                report.caught_up = True
            if not report.caught_up:
                behind = [c.index for c in chaos_clients if not c.done.is_set()]
                report.problems.append(f"clients {behind[:10]} did not catch up")
            tg.cancel_scope.cancel()
        async with Replay(RedisStore.from_url(redis_server.url, prefix="chaos")) as reader:
            stream: dict[str, list[Any]] = {}
            epochs: dict[str, str] = {}
            for topic in names:
                events: list[Any] = []
                after = 0
                while page := await reader.history(topic, after=after, limit=10_000):
                    events += [e.data for e in page]
                    after = page[-1].offset
                    epochs[topic] = page[-1].epoch
                stream[topic] = events
        check(chaos_clients, stream, epochs, acked, report)
        for worker in workers:
            for line in worker.log_text().splitlines():
                if line.startswith("Traceback"):
                    report.server_tracebacks += 1
                    report.problems.append(f"{worker.name}: a traceback in its log")
                elif "ERROR" in line:
                    report.server_error_lines += 1
    finally:
        for worker in workers:
            await anyio.to_thread.run_sync(worker.stop)
        await anyio.to_thread.run_sync(redis_server.stop)
        report.seconds = round(time.monotonic() - started, 1)
        if own_dir is not None and report.ok:
            own_dir.cleanup()
        elif own_dir is not None:
            print(f"chaos: logs kept in {workdir}", flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chaos runner (see the module docstring)")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of faults and publishing")
    parser.add_argument("--seed", type=int, default=None, help="replay a run: the seed it printed")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--topics", type=int, default=10)
    parser.add_argument("--rate", type=float, default=30.0, help="events per second, all topics together")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    report = anyio.run(lambda: run_chaos(args.duration, seed, clients=args.clients, topics=args.topics, rate=args.rate))
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
