"""Benchmark runner: the baseline and every contender in the same run.

Usage (from the repository root, after ``bench/setup.sh`` for the peers)::

    .venv/bin/python -m bench.run fanout     # delivered events/s, N = 1, 100, 1000 clients
    .venv/bin/python -m bench.run latency    # open loop: 1000/s and 100/s to 100 clients, 50/s and 10/s to 1000
    .venv/bin/python -m bench.run catchup    # resume after K = 10,000 missed events
    .venv/bin/python -m bench.run publish    # sequential and 50 concurrent publishers (RedisStore)
    .venv/bin/python -m bench.run memory     # RSS per idle subscribed connection (or SSE stream), 2,000 of them
    .venv/bin/python -m bench.run topics     # N clients on N topics, a publisher per topic; N = 100, 1000, 5000
                                             # (replay-cluster: the same on a local 3+3 Redis Cluster)
    .venv/bin/python -m bench.run publish-topics  # N concurrent publishers on N topics (RedisStore); N = 1, 50, 2000
    .venv/bin/python -m bench.run tokens     # N token streams at 30 tokens/s (RedisStore); N = 100, 250, 500, 1000
    .venv/bin/python -m bench.run all

Options: ``--reps 3`` (medians of that many runs), ``--quick`` (tiny sizes, for
the smoke test), ``--contenders a,b``, ``--clients 100,1000`` (only these sizes: fanout's and
topics' clients, publish-topics' publishers), ``--scrape`` (fanout and topics: each of the
library's contenders runs twice per measurement, as itself and as ``<name>+scrape``, whose
``/metrics`` is scraped every second from a thread of the runner while the client runs; the
table gives the scraped runs' ratio to the same contender's unscraped ones in the same run).
Each server is a uvicorn process of its own (uvloop, httptools, ``--ws websockets-sansio``,
which is what ``--ws auto`` picks with websockets installed), started fresh for every measurement on a free
port of 127.0.0.1; the lean client (``bench/client.py``) runs in another
process. The runner starts its own redis-server on a free port in a temporary
directory (``appendonly yes``, ``appendfsync everysec``). Every step has a
timeout. Results go to ``bench/results/<benchmark>.json`` and a table of
medians with ratios to the baseline is printed. ``topics`` and
``publish-topics`` also sample ``INFO clients`` of that redis-server every
50 ms during each measurement and report the most connections seen (the
sampler's own left out). For ``topics`` with the contender ``replay-cluster``
the runner also starts a local Redis Cluster (3 primaries, 3 replicas, the
same persistence settings, ``redis-cli --cluster create``) beside the single
redis-server, in the same run: its connections are summed over the
primaries, and each row says how the topics' keys spread over the shards
(``shard_keys``: keys added per primary).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import raise_nofile

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SERVERS = BENCH / "servers"
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"
MAIN_PYTHON = Path(sys.executable)

__all__ = ["CONTENDERS", "BenchError", "Config", "available", "main", "run_benchmark"]


class BenchError(RuntimeError):
    """A server or client failed."""


@dataclass(frozen=True)
class Contender:
    name: str
    venv: str | None  # None: the project's venv (this interpreter)
    app: str
    kind: str  # the lean client's protocol
    env: Callable[[str], dict[str, str]] = field(default=lambda redis_url: {})
    path: str = "/ws"  # the route the lean client connects to

    @property
    def python(self) -> Path:
        return MAIN_PYTHON if self.venv is None else VENVS / self.venv / "bin" / "python"


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("bare", None, "bare:app", "plain"),
        Contender("replay-memory", None, "replay_app:app", "replay", lambda url: {"BENCH_STORE": "memory"}),
        Contender(
            "replay-redis",
            None,
            "replay_app:app",
            "replay",
            lambda url: {"BENCH_STORE": "redis", "BENCH_REDIS_URL": url},
        ),
        # The same servers' SSE route (one GET per client, the same frames in data: lines).
        Contender(
            "replay-memory-sse", None, "replay_app:app", "sse", lambda url: {"BENCH_STORE": "memory"}, path="/sse"
        ),
        Contender(
            "replay-redis-sse",
            None,
            "replay_app:app",
            "sse",
            lambda url: {"BENCH_STORE": "redis", "BENCH_REDIS_URL": url},
            path="/sse",
        ),
        Contender(
            "broadcaster-redis",
            "broadcaster",
            "broadcaster_app:app",
            "plain",
            lambda url: {"BENCH_BROADCAST_URL": url},
        ),
        Contender(
            "broadcaster-stream",
            "broadcaster",
            "broadcaster_app:app",
            "plain",
            lambda url: {"BENCH_BROADCAST_URL": url.replace("redis://", "redis-stream://", 1)},
        ),
        Contender("socketio-redis", "socketio", "socketio_app:app", "socketio", lambda url: {"BENCH_REDIS_URL": url}),
        # the library on a Redis Cluster (topics only): the url is a node of the runner's cluster
        Contender(
            "replay-cluster",
            None,
            "replay_app:app",
            "replay",
            lambda url: {"BENCH_STORE": "redis", "BENCH_REDIS_URL": url, "BENCH_REDIS_CLUSTER": "1"},
        ),
    ]
}


def available(name: str) -> bool:
    """Whether a contender can run here (its venv exists; the library's always can)."""
    contender = CONTENDERS[name]
    return contender.python.exists()


@dataclass
class Config:
    quick: bool = False
    reps: int = 3
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    verbose: bool = True
    sizes: list[int] = field(default_factory=list)  # fanout, topics, publish-topics: only these sizes (empty: all)
    scrape: bool = False  # fanout, topics: the library's contenders also run with /metrics scraped every second

    def log(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)


# --- processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server of our own on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise BenchError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(process)


def _start_redis(binary: str, workdir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _answers(port: int, command: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(command)
            data = b""
            while not data.endswith(b"\r\n") or len(data) < len(expect):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return expect in data
    except OSError:
        return False


@contextmanager
def redis_cluster(workdir: Path, primaries: int = 3) -> Iterator[list[str]]:
    """A local Redis Cluster of our own (``primaries`` primaries, a replica each) on free
    ports; yields the primaries' URLs (any of them serves as the store's URL)."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise BenchError("redis-server and redis-cli are needed for a cluster")
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for i in range(2 * primaries):
            port, bus = free_port(), free_port()
            directory = workdir / f"cluster-{i}"
            directory.mkdir()
            extra = ("--cluster-enabled", "yes", "--cluster-port", str(bus))
            extra += ("--cluster-config-file", str(directory / "nodes.conf"))
            processes.append(_start_redis(binary, directory, port, *extra))
            ports.append(port)
        deadline = time.monotonic() + 10
        while not all(_answers(port, b"PING\r\n", b"+PONG") for port in ports):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise BenchError("a cluster node did not start")
            time.sleep(0.05)
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports)]
        create += ["--cluster-replicas", "1", "--cluster-yes"]
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(_answers(port, b"CLUSTER INFO\r\n", b"cluster_state:ok") for port in ports):
            if time.monotonic() > deadline:
                raise BenchError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        # redis-cli made the first `primaries` nodes the primaries
        yield [f"redis://127.0.0.1:{port}/0" for port in ports[:primaries]]
    finally:
        for process in processes:
            _stop(process)


def dbsize(url: str) -> int:
    """Keys in db 0 of the Redis at ``url`` (one node of a cluster: its shard's)."""
    netloc = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"DBSIZE\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise BenchError("DBSIZE: the connection closed")
            data += chunk
    if not data.startswith(b":"):
        raise BenchError(f"DBSIZE: unexpected reply {data!r}")
    return int(data[1:].strip())


class RedisClients:
    """Samples ``INFO clients stats`` of a redis-server from a thread, on a connection
    of its own, every ``interval`` seconds while in the ``with`` block (and once at
    entry and at exit).

    ``seen``: the most ``connected_clients`` seen, this sampler's own left out
    (a peak shorter than ``interval`` can be missed); ``before``: the same at
    entry; ``opened``: connections Redis accepted in the block
    (``total_connections_received``: exact, not sampled). With ``idle``, entry
    first waits (bounded) until Redis has at most that many other clients. Bounded: each read has
    a timeout, the thread is joined with one; a sampler that failed raises at exit.
    """

    def __init__(self, url: str, interval: float = 0.05, idle: int | None = None) -> None:
        netloc = url.split("//", 1)[1].split("/", 1)[0]
        host, _, port = netloc.rpartition(":")
        self.address = (host, int(port))
        self.interval = interval
        self.idle = idle  # at entry, first wait until Redis has at most this many other clients
        self.samples: list[tuple[int, int]] = []  # (connected_clients, total_connections_received)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="redis-clients", daemon=True)

    def sample(self) -> tuple[int, int]:
        """One read: connected_clients (this connection included), total_connections_received."""
        assert self._sock is not None
        self._sock.sendall(b"INFO clients stats\r\n")
        data = b""
        while b"\r\n" not in data:
            data += self._recv()
        header, _, body = data.partition(b"\r\n")
        if not header.startswith(b"$"):
            raise BenchError(f"INFO clients: unexpected reply {data[:100]!r}")
        size = int(header[1:])
        while len(body) < size + 2:
            body += self._recv()
        fields = dict(line.split(":", 1) for line in body[:size].decode().splitlines() if ":" in line)
        try:
            return int(fields["connected_clients"]), int(fields["total_connections_received"])
        except KeyError as exc:
            raise BenchError(f"INFO clients stats: no {exc}") from exc

    def wait_for_at_most(self, connections: int, timeout: float = 10.0) -> None:
        """Until Redis reports at most ``connections`` clients besides this one: the
        closes of a client that just ended reach Redis a moment after it returns."""
        deadline = time.monotonic() + timeout
        while True:
            connected = self.sample()[0] - 1
            if connected <= connections:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"Redis still has {connected} clients after {timeout} s (expected {connections})")
            self._stop.wait(0.01)  # a poll interval: the condition is re-read above

    def _recv(self) -> bytes:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise BenchError("INFO clients: redis-server closed the connection")
        return chunk

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.samples.append(self.sample())
        except BaseException as exc:  # reported at exit
            self.error = exc

    @property
    def before(self) -> int:
        return self.samples[0][0] - 1

    @property
    def seen(self) -> int:
        return max(connected for connected, _ in self.samples) - 1

    @property
    def opened(self) -> int:
        return self.samples[-1][1] - self.samples[0][1]

    def report(self) -> dict[str, int]:
        return {
            "redis_connections": self.seen,
            "redis_connections_before": self.before,
            "redis_connections_opened": self.opened,
        }

    def __enter__(self) -> RedisClients:
        self._sock = socket.create_connection(self.address, timeout=5)
        try:
            if self.idle is not None:
                self.wait_for_at_most(self.idle)
            self.samples.append(self.sample())
        except BaseException:
            self._sock.close()
            raise
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            if self.error is None and not self._thread.is_alive():
                self.samples.append(self.sample())
        finally:
            assert self._sock is not None
            self._sock.close()
        if self._thread.is_alive():
            raise BenchError("the INFO clients sampler did not stop")
        if self.error is not None and exc_info[0] is None:
            raise BenchError(f"the INFO clients sampler failed: {self.error!r}") from self.error


@dataclass
class Server:
    contender: Contender
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError("no VmRSS")

    def post(self, path: str, timeout: float = 120.0) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise BenchError(f"{self.contender.name} POST {path}: {response.status} {body[:300]!r}")
        result: dict[str, Any] = json.loads(body)
        return result


@contextmanager
def server(contender: Contender, redis_url: str, workdir: Path) -> Iterator[Server]:
    """One uvicorn process serving ``contender`` on a free port, stopped afterwards."""
    port = free_port()
    log = workdir / f"{contender.name}-{port}.log"
    env = dict(os.environ)
    env.update(contender.env(redis_url))
    env["PYTHONPATH"] = os.pathsep.join([str(SERVERS), str(ROOT)])
    command = [str(contender.python), "-m", "uvicorn", contender.app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio"]
    command += ["--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "3"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=SERVERS, env=env)
    srv = Server(contender, port, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise BenchError(f"{contender.name} exited at start:\n{log.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{contender.name} did not answer /health:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield srv
    finally:
        _stop(process)


class Scraper:
    """GETs ``/metrics`` of ``srv`` once at entry, then every ``interval`` seconds from a
    thread while in the ``with`` block, as Prometheus would. ``scrapes``: how many
    answered 200; one that failed (another status, a timeout) raises at exit."""

    def __init__(self, srv: Server, interval: float = 1.0) -> None:
        self.srv = srv
        self.interval = interval
        self.scrapes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def scrape(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200 or b"starlette_replay_" not in body:
            raise BenchError(f"GET /metrics: {response.status} {body[:300]!r}")
        self.scrapes += 1

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.scrape()
        except BaseException as exc:  # reported at exit
            self.error = exc

    def __enter__(self) -> Scraper:
        self.scrape()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(15)
        if self._thread.is_alive():
            raise BenchError("the metrics scraper did not stop")
        if self.error is not None and exc_info[0] is None:
            raise BenchError(f"the metrics scraper failed: {self.error!r}") from self.error


def _variants(cfg: Config, contenders: list[Contender]) -> list[tuple[Contender, bool]]:
    """Each contender unscraped; with ``--scrape``, the library's also scraped, right after."""
    out = []
    for contender in contenders:
        out.append((contender, False))
        if cfg.scrape and contender.kind == "replay":
            out.append((contender, True))
    return out


def _scraping(srv: Server, scraped: bool) -> AbstractContextManager[Scraper | None]:
    return Scraper(srv) if scraped else nullcontext()


def client(
    srv: Server, *args: str, timeout: float = 120.0, kind: str | None = None, path: str | None = None
) -> dict[str, Any]:
    """Run the lean client once against ``srv`` (its contender's route unless ``path``) and return its JSON report."""
    command = [str(MAIN_PYTHON), str(BENCH / "client.py"), "--url", srv.ws(path or srv.contender.path)]
    command += ["--http", srv.http]
    command += ["--kind", kind or srv.contender.kind, "--timeout", str(timeout), *args]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"client against {srv.contender.name} did not finish") from exc
    if done.returncode != 0:
        raise BenchError(
            f"client against {srv.contender.name} failed:\n{done.stderr.decode()[-3000:]}\n"
            f"server log:\n{srv.log.read_text(errors='replace')[-3000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def topic() -> str:
    return "b-" + uuid.uuid4().hex[:8]


def warm_up(srv: Server, *options: str) -> None:
    """A few events to a few clients: imports and first-call costs out of the figures."""
    client(srv, "--clients", "2", "--events", "100", "--topic", topic(), *options, timeout=30)


# --- the benchmarks ---------------------------------------------------------------------


def _runnable(cfg: Config, names: list[str]) -> list[Contender]:
    chosen = []
    for name in names:
        if name not in cfg.contenders:
            continue
        if not available(name):
            cfg.log(f"  (skipping {name}: its venv is missing, run bench/setup.sh)")
            continue
        chosen.append(CONTENDERS[name])
    return chosen


def bench_fanout(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """Delivered events/s: 1 publisher (the trigger), N clients on one topic."""
    sizes = [(2, 50)] if cfg.quick else [(1, 5_000), (100, 2_000), (1000, 300)]
    if cfg.sizes:
        sizes = [size for size in sizes if size[0] in cfg.sizes]
    rows = []
    for rep in range(cfg.reps):
        for clients, events in sizes:
            for contender, scraped in _variants(cfg, _runnable(cfg, list(CONTENDERS))):
                name = contender.name + ("+scrape" if scraped else "")
                with server(contender, redis_url, workdir) as srv:
                    warm_up(srv)
                    cpu = srv.cpu_seconds()
                    with _scraping(srv, scraped) as scraper:
                        r = client(srv, "--clients", str(clients), "--events", str(events), "--topic", topic())
                    # the whole client run: its handshakes and subscribes too, not only the events
                    r["server_cpu_us"] = (srv.cpu_seconds() - cpu) * 1e6 / events
                    if scraper is not None:
                        r["scrapes"] = scraper.scrapes
                cfg.log(
                    f"  fanout rep {rep} N={clients} {name}: {r['rate']:.0f} ev/s "
                    f"(received {r['received']}/{r['expected']}, gaps {r['gaps']}, dups {r['duplicates']}, "
                    f"closes {r['closes']}), server CPU {r['server_cpu_us']:.0f} µs per event"
                )
                rows.append({"contender": name, "rep": rep, "clients": clients, **r})
    return rows


def bench_latency(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """Open loop at fixed rates; publish-to-receive latency, gaps and duplicates."""
    # The two rates, plus 100/s to 100 clients and 10/s to 1000: below every
    # contender's saturation on these 2 cores (the rates are at or past bare's).
    cases = (
        [(3, 200.0, 0.5)]
        if cfg.quick
        else [(100, 1000.0, 3.0), (100, 100.0, 3.0), (1000, 50.0, 3.0), (1000, 10.0, 3.0)]
    )
    rows = []
    for rep in range(cfg.reps):
        for clients, rate, seconds in cases:
            events = int(rate * seconds)
            for contender in _runnable(cfg, list(CONTENDERS)):
                with server(contender, redis_url, workdir) as srv:
                    warm_up(srv)
                    r = client(
                        srv,
                        *("--clients", str(clients), "--events", str(events), "--rate", str(rate)),
                        *("--topic", topic(), "--latency"),
                    )
                lat = r["latency_ms"]
                cfg.log(
                    f"  latency rep {rep} N={clients} {rate:.0f}/s {contender.name}: p50 {lat['p50']:.2f} ms, "
                    f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms, gaps {r['gaps']}, dups {r['duplicates']}, "
                    f"received {r['received']}/{r['expected']}"
                )
                rows.append({"contender": contender.name, "rep": rep, "clients": clients, "target_rate": rate, **r})
    return rows


def bench_catchup(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """A client resumes after K missed events; the raw redis-py loop is the baseline."""
    k = 200 if cfg.quick else 10_000
    rows = []
    for rep in range(cfg.reps):
        for contender in _runnable(cfg, ["replay-redis", "replay-memory"]):
            with server(contender, redis_url, workdir) as srv:
                warm_up(srv)
                runs = [(contender.name, "replay", "/ws")]
                if contender.name == "replay-redis":
                    runs.insert(0, ("raw-redis-loop", "raw", "/raw"))
                for name, kind, path in runs:
                    t = topic()
                    published = srv.post(f"/publish?topic={t}&n={k}")
                    r = client(
                        srv,
                        *("--mode", "catchup", "--events", str(k), "--topic", t),
                        *("--epoch", published["epoch"], "--after", "0"),
                        kind=kind,
                        path=path,
                    )
                    cfg.log(
                        f"  catchup rep {rep} {name}: {r['seconds'] * 1000:.0f} ms, {r['rate']:.0f} ev/s "
                        f"(received {r['received']}/{k}, gaps {r['gaps']}, dups {r['duplicates']})"
                    )
                    rows.append({"contender": name, "rep": rep, **r})
    return rows


def bench_publish(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """Publish rate with RedisStore, sequential and 50 concurrent, against raw redis-py."""
    n = 100 if cfg.quick else 5_000
    rows = []
    for rep in range(cfg.reps):
        for contender in _runnable(cfg, ["replay-redis"]):
            with server(contender, redis_url, workdir) as srv:
                srv.post(f"/publish-bench?topic={topic()}&n={min(n, 500)}&c=1&mode=lib")  # warm-up
                modes = ["raw-script", "lib", "raw-xadd"]
                if rep % 2:  # alternate the order: Redis and the machine drift within a run
                    modes.reverse()
                for concurrency in (1, 50):
                    for mode in modes:
                        r = srv.post(f"/publish-bench?topic={topic()}&n={n}&c={concurrency}&mode={mode}")
                        name = {"lib": "replay-redis", "raw-script": "raw-redis-script", "raw-xadd": "raw-xadd-publish"}
                        cfg.log(f"  publish rep {rep} c={concurrency} {name[mode]}: {r['rate']:.0f} ev/s")
                        rows.append({"contender": name[mode], "rep": rep, "concurrency": concurrency, **r})
    return rows


def bench_memory(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """Resident memory per idle subscribed connection."""
    count = 20 if cfg.quick else 2_000
    rows = []
    for rep in range(cfg.reps):
        for contender in _runnable(cfg, list(CONTENDERS)):
            with server(contender, redis_url, workdir) as srv:
                warm_up(srv)
                before = srv.rss_kib()
                t = topic()
                command = [str(MAIN_PYTHON), str(BENCH / "client.py"), "--url", srv.ws(contender.path)]
                command += ["--http", srv.http]
                command += ["--kind", contender.kind, "--mode", "idle", "--clients", str(count), "--topic", t]
                holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                try:
                    assert holder.stdout is not None and holder.stdin is not None
                    line = _readline(holder, timeout=120)
                    if not line.startswith(b'{"ready"'):
                        raise BenchError(f"idle client against {contender.name} failed: {line!r}")
                    time.sleep(0.5 if cfg.quick else 2.0)  # let the server settle before reading its RSS
                    after = srv.rss_kib()
                finally:
                    if holder.stdin is not None:
                        holder.stdin.close()
                    try:
                        holder.wait(30)
                    except subprocess.TimeoutExpired:
                        holder.kill()
                        holder.wait()
                    if holder.stdout is not None:
                        holder.stdout.close()
            per = (after - before) * 1024 / count
            cfg.log(f"  memory rep {rep} {contender.name}: {per / 1024:.1f} KiB per connection ({count} connections)")
            rows.append(
                {"contender": contender.name, "rep": rep, "connections": count, "rss_before_kib": before}
                | {"rss_after_kib": after, "bytes_per_connection": per}
            )
    return rows


TOPICS_CONTENDERS = ["bare", "replay-memory", "replay-redis", "replay-cluster", "broadcaster-redis", "socketio-redis"]


def _sum_reports(samplers: list[RedisClients]) -> dict[str, int]:
    reports = [sampler.report() for sampler in samplers]
    return {key: sum(report[key] for report in reports) for key in reports[0]}


def bench_topics(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """N clients, each on a topic of its own, and N publishers at once (one per topic)."""
    sizes = [(3, 20)] if cfg.quick else [(100, 300), (1000, 30), (5000, 5)]
    if cfg.sizes:
        sizes = [size for size in sizes if size[0] in cfg.sizes]
    contenders = _runnable(cfg, TOPICS_CONTENDERS)
    rows = []
    with ExitStack() as stack:
        # the cluster beside the single redis-server, in the same run, when it is wanted
        shards = (
            stack.enter_context(redis_cluster(workdir)) if any(c.name == "replay-cluster" for c in contenders) else []
        )
        for rep in range(cfg.reps):
            for clients, events in sizes:
                for contender, scraped in _variants(cfg, contenders):
                    urls = shards if contender.name == "replay-cluster" else [redis_url]
                    rows.append(_topics_run(cfg, contender, scraped, urls, workdir, rep, clients, events))
    return rows


TOKEN_RATE = 30.0  # tokens/s per stream: an LLM answer's pace


def bench_tokens(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """N token streams at once on RedisStore, a client connection per stream (the topics benchmark's shape).

    Each stream produces tokens at ``TOKEN_RATE`` for 10 s, open loop (a token
    is due at its time whether or not the store kept up), as one event per
    token (``token``) or through ``TokenStream`` (``coalesce``). Reported:
    delivered tokens/s against the offered N x 30, p99 token latency (due time
    to the client's receive), events, server CPU, Redis connections. Where
    delivered falls below 95 % of offered, or p99 passes 1 s, it saturates.
    """
    rate = 100.0 if cfg.quick else TOKEN_RATE
    sizes = [(3, 20)] if cfg.quick else [(n, int(TOKEN_RATE * 10)) for n in (100, 250, 500, 1000)]
    if cfg.sizes:
        sizes = [size for size in sizes if size[0] in cfg.sizes]
    contender = CONTENDERS["replay-redis"]
    rows = []
    for rep in range(cfg.reps):
        for streams, tokens in sizes:
            for mode in ("token", "coalesce"):
                name = f"replay-redis/{mode}"
                try:
                    with server(contender, redis_url, workdir) as srv:
                        warm_up(srv, "--distinct")
                        cpu = srv.cpu_seconds()
                        with RedisClients(redis_url, interval=0.01 if cfg.quick else 0.05) as redis_clients:
                            r = client(
                                srv,
                                *("--mode", "tokens", "--clients", str(streams), "--topic", topic(), "--distinct"),
                                *("--trigger", f"rate={rate}&tokens={tokens}&mode={mode}", "--latency"),
                                timeout=300,
                            )
                        r["server_cpu_us"] = (srv.cpu_seconds() - cpu) * 1e6 / max(1, r["tokens"])
                except BenchError as exc:
                    why = _failure(str(exc))
                    cfg.log(f"  tokens rep {rep} N={streams} {name}: FAILED: {why}")
                    rows.append({"contender": name, "rep": rep, "streams": streams, "error": why})
                    continue
                r.update(redis_clients.report())
                r["offered_rate"] = streams * rate
                r["saturated"] = r["token_rate"] < 0.95 * r["offered_rate"] or r["latency_ms"]["p99"] > 1000
                cfg.log(
                    f"  tokens rep {rep} N={streams} {name}: {r['token_rate']:.0f} tokens/s delivered of "
                    f"{r['offered_rate']:.0f} offered (tokens {r['tokens']}/{r['tokens_expected']}, events "
                    f"{r['received']}/{r['events_expected']}, gaps {r['gaps']}, dups {r['duplicates']}, "
                    f"closes {r['closes']}), p99 {r['latency_ms']['p99']:.1f} ms, producers late p99 "
                    f"{r['publish']['producer_late_p99_ms']:.1f} ms, server CPU {r['server_cpu_us']:.0f} µs "
                    f"per token, Redis connections seen {r['redis_connections']}"
                    + (" SATURATED" if r["saturated"] else "")
                )
                rows.append({"contender": name, "rep": rep, "streams": streams, **r})
    return rows


def _topics_run(
    cfg: Config,
    contender: Contender,
    scraped: bool,
    urls: list[str],
    workdir: Path,
    rep: int,
    clients: int,
    events: int,
) -> dict[str, Any]:
    """One topics measurement on ``urls`` (one Redis, or the primaries of a cluster)."""
    name = contender.name + ("+scrape" if scraped else "")
    try:
        with server(contender, urls[0], workdir) as srv, ExitStack() as samplers:
            warm_up(srv, "--distinct")
            cpu = srv.cpu_seconds()
            keys_before = [dbsize(url) for url in urls] if len(urls) > 1 else []
            redis_clients = [
                samplers.enter_context(RedisClients(url, interval=0.01 if cfg.quick else 0.05)) for url in urls
            ]
            scraper = samplers.enter_context(_scraping(srv, scraped))
            r = client(
                srv,
                *("--clients", str(clients), "--events", str(events), "--topic", topic()),
                "--distinct",
                timeout=300,
            )
            samplers.close()
            if keys_before:
                r["shard_keys"] = [dbsize(url) - before for url, before in zip(urls, keys_before, strict=True)]
            # the whole client run (handshakes, subscribes), per event published (and delivered once)
            r["server_cpu_us"] = (srv.cpu_seconds() - cpu) * 1e6 / (clients * events)
            if scraper is not None:
                r["scrapes"] = scraper.scrapes
    except BenchError as exc:  # reported as a failed run; the others go on
        why = _failure(str(exc))
        cfg.log(f"  topics rep {rep} N={clients} {name}: FAILED: {why}")
        return {"contender": name, "rep": rep, "clients": clients, "error": why}
    r.update(_sum_reports(redis_clients))
    shards = f", keys per shard {r['shard_keys']}" if "shard_keys" in r else ""
    cfg.log(
        f"  topics rep {rep} N={clients} {name}: {r['rate']:.0f} ev/s "
        f"(received {r['received']}/{r['expected']}, gaps {r['gaps']}, dups {r['duplicates']}, "
        f"closes {r['closes']}), server CPU {r['server_cpu_us']:.0f} µs per event, "
        f"Redis connections seen {r['redis_connections']} ({r['redis_connections_before']} before, "
        f"{r['redis_connections_opened']} opened){shards}"
    )
    return {"contender": name, "rep": rep, "clients": clients, **r}


def _failure(message: str) -> str:
    """The telling line of a failure: the last exception line of the server's log, else the client's."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line or "Unavailable:" in line or "Exception:" in line:
            return line[:500]
    return lines[-1][:500] if lines else message[:500]


PUBLISH_TOPICS_MODES = {"raw-pool": "raw-redis-pool", "lib": "replay-redis", "raw-pipeline": "raw-redis-pipeline"}


def bench_publish_topics(cfg: Config, redis_url: str, workdir: Path) -> list[dict[str, Any]]:
    """N concurrent publishers on N topics: RedisStore against raw redis-py (a pool of 50, one pipelined connection)."""
    sizes = [(1, 20), (20, 5)] if cfg.quick else [(1, 20_000), (50, 1_000), (2_000, 15)]
    if cfg.sizes:
        sizes = [size for size in sizes if size[0] in cfg.sizes]
    rows = []
    # The replay server without a store on Redis: each measurement makes its own
    # client and closes it after, so every Redis connection seen is that client's.
    publishers_server = Contender(
        "replay-redis", None, "replay_app:app", "replay", lambda url: {"BENCH_STORE": "memory", "BENCH_REDIS_URL": url}
    )
    for rep in range(cfg.reps):
        for contender in [publishers_server] if "replay-redis" in cfg.contenders else []:
            with server(contender, redis_url, workdir) as srv:
                for mode in PUBLISH_TOPICS_MODES:  # warm-up
                    srv.post(f"/publish-topics-bench?topic={topic()}&topics=2&n=50&mode={mode}")
                modes = list(PUBLISH_TOPICS_MODES)
                if rep % 2:  # alternate the order: Redis and the machine drift within a run
                    modes.reverse()
                for publishers, events in sizes:
                    for mode in modes:
                        name = PUBLISH_TOPICS_MODES[mode]
                        try:
                            # idle=0: the previous measurement's client has closed all its connections
                            interval = 0.01 if cfg.quick else 0.05
                            with RedisClients(redis_url, interval=interval, idle=0) as redis_clients:
                                r = srv.post(
                                    f"/publish-topics-bench?topic={topic()}&topics={publishers}&n={events}&mode={mode}",
                                    timeout=300,
                                )
                        except BenchError as exc:  # reported as a failed run; the others go on
                            why = _failure(str(exc) + "\n" + srv.log.read_text(errors="replace")[-3000:])
                            cfg.log(f"  publish-topics rep {rep} N={publishers} {name}: FAILED: {why}")
                            rows.append({"contender": name, "rep": rep, "publishers": publishers, "error": why})
                            continue
                        r.update(redis_clients.report())
                        cfg.log(
                            f"  publish-topics rep {rep} N={publishers} {name}: {r['rate']:.0f} ev/s, "
                            f"Redis connections seen {r['redis_connections']} ({r['redis_connections_before']} before, "
                            f"{r['redis_connections_opened']} opened)"
                        )
                        rows.append({"contender": name, "rep": rep, "publishers": publishers, **r})
    return rows


def _readline(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError("idle client did not get ready in time")
    return process.stdout.readline()


BENCHMARKS: dict[str, Callable[[Config, str, Path], list[dict[str, Any]]]] = {
    "fanout": bench_fanout,
    "latency": bench_latency,
    "catchup": bench_catchup,
    "publish": bench_publish,
    "memory": bench_memory,
    "topics": bench_topics,
    "publish-topics": bench_publish_topics,
    "tokens": bench_tokens,
}

# What each benchmark's table compares: (group key, figure, higher is better, baseline).
TABLES: dict[str, tuple[tuple[str, ...], str, bool, str]] = {
    "fanout": (("clients",), "rate", True, "bare"),
    "latency": (("clients", "target_rate"), "p99", False, "bare"),
    "catchup": ((), "rate", True, "raw-redis-loop"),
    "publish": (("concurrency",), "rate", True, "raw-redis-script"),
    "memory": ((), "bytes_per_connection", False, "bare"),
    "topics": (("clients",), "rate", True, "bare"),
    "publish-topics": (("publishers",), "rate", True, "raw-redis-pool"),
    "tokens": (("streams",), "token_rate", True, "replay-redis/token"),
}
# A second ratio for some tables: to this contender's median in the same group.
CEILINGS: dict[str, str] = {"publish-topics": "raw-redis-pipeline"}


def _figure(row: dict[str, Any], name: str) -> float:
    if name in ("p50", "p99", "max"):
        return float(row["latency_ms"][name])
    return float(row[name])


def summarize(benchmark: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (group, contender) and the ratio to the baseline's median in the same run."""
    keys, figure, _, baseline = TABLES[benchmark]
    groups: dict[tuple[Any, ...], dict[str, list[dict[str, Any]]]] = {}
    failed: dict[tuple[Any, ...], list[str]] = {}
    for row in rows:
        if "error" in row:  # a failed run: counted, not measured
            failed.setdefault((*(row[k] for k in keys), row["contender"]), []).append(row["error"])
            continue
        group = tuple(row[k] for k in keys)
        groups.setdefault(group, {}).setdefault(row["contender"], []).append(row)
    table = []
    for group, by_contender in groups.items():
        base = by_contender.get(baseline)
        base_median = statistics.median(_figure(r, figure) for r in base) if base else None
        ceiling = by_contender.get(CEILINGS.get(benchmark, ""))
        ceiling_median = statistics.median(_figure(r, figure) for r in ceiling) if ceiling else None
        for name, runs in by_contender.items():
            entry: dict[str, Any] = dict(zip(keys, group, strict=True))
            entry.update(contender=name, runs=len(runs), median=statistics.median(_figure(r, figure) for r in runs))
            entry["ratio"] = entry["median"] / base_median if base_median else None
            entry["failed"] = len(failed.pop((*group, name), []))
            if benchmark in CEILINGS:
                entry["ceiling_ratio"] = entry["median"] / ceiling_median if ceiling_median else None
            if name.endswith("+scrape"):  # --scrape: against the same contender unscraped, same run
                unscraped = by_contender.get(name.removesuffix("+scrape"))
                if unscraped:
                    unscraped_median = statistics.median(_figure(r, figure) for r in unscraped)
                    entry["unscraped_ratio"] = entry["median"] / unscraped_median
                entry["scrapes"] = sum(r.get("scrapes", 0) for r in runs)
            if benchmark == "latency":
                for extra in ("p50", "max"):
                    entry[extra] = statistics.median(_figure(r, extra) for r in runs)
            if benchmark in ("fanout", "topics", "tokens") and all("server_cpu_us" in r for r in runs):
                entry["cpu_us"] = statistics.median(r["server_cpu_us"] for r in runs)
            if all("redis_connections" in r for r in runs):
                entry["redis_connections"] = max(r["redis_connections"] for r in runs)
                entry["redis_connections_opened"] = max(r["redis_connections_opened"] for r in runs)
            if benchmark == "tokens":
                entry["offered"] = runs[0]["offered_rate"]
                entry["p99"] = statistics.median(_figure(r, "p99") for r in runs)
                entry["events"] = statistics.median(r["received"] for r in runs)
                entry["saturated"] = sum(r["saturated"] for r in runs)
            if benchmark in ("fanout", "latency", "catchup", "topics", "tokens"):
                entry["gaps"] = sum(r["gaps"] for r in runs)
                entry["duplicates"] = sum(r["duplicates"] for r in runs)
                entry["short"] = sum(r["received"] < r["expected"] for r in runs)
                entry["closes"] = sum(sum(r["closes"].values()) for r in runs)
            table.append(entry)
    for key, errors in failed.items():  # contenders with no run that finished
        entry = dict(zip(keys, key[:-1], strict=True))
        entry.update(contender=key[-1], runs=0, median=None, ratio=None, failed=len(errors), error=errors[-1])
        table.append(entry)
    return table


def print_table(benchmark: str, table: list[dict[str, Any]]) -> None:
    keys, figure, higher, baseline = TABLES[benchmark]
    print(f"\n## {benchmark}: median {figure} ({'higher' if higher else 'lower'} is better), ratio to {baseline}")
    for entry in table:
        group = " ".join(f"{k}={entry[k]}" for k in keys)
        ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.2f}x"
        if entry["median"] is None:
            print(f"{group:24} {entry['contender']:20} {'FAILED':>12} {ratio:>7} (n=0, failed {entry['failed']})")
            print(f"{'':24}   {entry['error']}")
            continue
        extra = f"  failed runs {entry['failed']}" if entry.get("failed") else ""
        if benchmark == "latency":
            extra = f"  p50 {entry['p50']:.2f} ms  max {entry['max']:.2f} ms"
        if benchmark == "tokens":
            extra += f"  of {entry['offered']:.0f} offered, p99 {entry['p99']:.1f} ms, events {entry['events']:.0f}"
            extra += f", saturated runs {entry['saturated']}"
        if "ceiling_ratio" in entry:
            ceiling = "-" if entry["ceiling_ratio"] is None else f"{entry['ceiling_ratio']:.2f}x"
            extra += f"  {ceiling} of {CEILINGS[benchmark]}"
        if "unscraped_ratio" in entry:
            extra += f"  {entry['unscraped_ratio']:.3f}x unscraped ({entry['scrapes']} scrapes)"
        if "cpu_us" in entry:
            extra += f"  server CPU {entry['cpu_us']:.0f} µs/{'token' if benchmark == 'tokens' else 'event'}"
        if "redis_connections" in entry:
            extra += f"  Redis connections {entry['redis_connections']} ({entry['redis_connections_opened']} opened)"
        if "gaps" in entry:
            extra += f"  gaps {entry['gaps']} dups {entry['duplicates']} short runs {entry['short']}"
            extra += f" server closes {entry['closes']}"
        print(f"{group:24} {entry['contender']:20} {entry['median']:>12.2f} {ratio:>7} (n={entry['runs']}){extra}")
    if benchmark == "tokens":
        for mode in sorted({e["contender"] for e in table}):
            rows = sorted(
                (e for e in table if e["contender"] == mode and e["median"] is not None), key=lambda e: e["streams"]
            )
            first = next((e for e in rows if e["saturated"] > 0), None)
            sizes = ", ".join(str(e["streams"]) for e in rows)
            where = f"first saturated at {first['streams']} streams" if first else "did not saturate"
            print(f"{mode}: {where} (sizes run: {sizes})")


def run_benchmark(name: str, cfg: Config) -> dict[str, Any]:
    """Run one benchmark (own redis-server, own servers) and return rows and the summary table."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        with redis_server(workdir) as redis_url:
            rows = BENCHMARKS[name](cfg, redis_url, workdir)
    return {
        "benchmark": name,
        "quick": cfg.quick,
        "reps": cfg.reps,
        "rows": rows,
        "table": summarize(name, rows),
        "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": sys.version.split()[0]},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke run")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--scrape",
        action="store_true",
        help="fanout, topics: also run the library's contenders with /metrics scraped every second",
    )
    parser.add_argument(
        "--clients",
        default="",
        help="fanout, topics, publish-topics: only these client (publisher) counts, e.g. 100,1000",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server and redis-server started here is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise_nofile(65536)  # the servers and clients started from here inherit it
    cfg = Config(quick=args.quick, reps=args.reps, contenders=args.contenders.split(","), scrape=args.scrape)
    cfg.sizes = [int(n) for n in args.clients.split(",") if n]
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cfg.log(f"# {name}")
        result = run_benchmark(name, cfg)
        suffix = "-quick" if cfg.quick else ""
        (args.out / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
        print_table(name, result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
