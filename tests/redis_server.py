"""A real redis-server for tests: own port, own directory, and ways to hurt it.

``RedisServer(tmp_dir).start()`` runs ``redis-server`` on a free 127.0.0.1 port
with its data in ``tmp_dir``. It can be killed with SIGKILL and restarted on the
same port and directory (with AOF on, what it acknowledged comes back), flushed,
and made to drop its pub/sub clients. The methods block: from async tests call
them through ``anyio.to_thread.run_sync``.

Fixtures: ``redis_server`` (one per test session, shared: use a unique prefix)
and ``redis_server_factory`` (fresh servers for tests that break them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from starlette_replay import Event, EventStore, RedisStore

__all__ = ["RecordingSink", "RedisServer", "attached", "connected", "free_port", "redis_server", "redis_server_factory"]

S = TypeVar("S", bound=EventStore)

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replica_caught_up(primary: RedisServer, replica: RedisServer) -> bool:
    """``replica`` is linked to ``primary`` and has applied all it had written when asked (INFO
    replication offsets: WAIT only waits for the calling connection's own writes). The primary
    is read first: under writes that go on, its offset read after the replica's would always
    be ahead."""
    with primary.client() as p, replica.client() as r:
        written = int(p.info("replication")["master_repl_offset"])
        info = r.info("replication")
        return info.get("master_link_status") == "up" and int(info.get("slave_repl_offset", -1)) >= written


class RedisServer:
    """One redis-server process (restartable on the same port and directory)."""

    def __init__(self, directory: Path, *, appendonly: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client for test-side commands (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, protocol=2)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart) the server and return once it accepts connections."""
        assert REDIS_SERVER is not None
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        # Waiting for the server's own "ready" line (a process start, not a test step).
        while True:
            if self.log.exists():
                with self.log.open("rb") as f:
                    f.seek(offset)
                    if b"Ready to accept connections" in f.read():
                        return self
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not ready within {timeout}s; see {self.log}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final save) and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            os.kill(process.pid, signal.SIGCONT)  # a frozen process dies only once it runs
            process.wait(timeout=10)

    def restart(self) -> None:
        """SIGKILL, then start again on the same port and directory."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()

    def freeze(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered (:meth:`thaw` resumes it)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def kill_pubsub_clients(self) -> int:
        """CLIENT KILL every pub/sub connection; returns how many were killed."""
        with self.client() as client:
            return int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _require_redis_server() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One shared server for the session: tests must use their own key prefix."""
    _require_redis_server()
    with RedisServer(tmp_path_factory.mktemp("redis-shared")) as server:
        yield server


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start fresh servers (stopped at the end of the test): ``factory(appendonly=True)``."""
    _require_redis_server()
    servers: list[RedisServer] = []

    def make(**options: bool | tuple[str, ...]) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", **options)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


class RecordingSink:
    """A LiveSink that records what a store delivers, with awaitable conditions."""

    def __init__(self) -> None:
        import anyio

        self.events: list[Event] = []
        self.resets: list[tuple[str, str]] = []
        self._changed = anyio.Event()

    def deliver(self, event: Event) -> None:
        self.events.append(event)
        self._poke()

    def reset(self, topic: str, reason: str) -> None:
        self.resets.append((topic, reason))
        self._poke()

    def _poke(self) -> None:
        import anyio

        self._changed.set()
        self._changed = anyio.Event()

    def of(self, topic: str) -> list[Event]:
        return [event for event in self.events if event.topic == topic]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``condition()`` holds after a delivery/reset; TimeoutError after ``timeout``."""
        import anyio

        with anyio.fail_after(timeout):
            while not condition():
                await self._changed.wait()


@asynccontextmanager
async def attached(store: S) -> AsyncIterator[tuple[S, RecordingSink]]:
    """``store`` connected to a :class:`RecordingSink`, and closed afterwards."""
    sink = RecordingSink()
    try:
        async with store.connect(sink):
            yield store, sink
    finally:
        await store.aclose()


def connected(url: str, **options: Any) -> AbstractAsyncContextManager[tuple[RedisStore, RecordingSink]]:
    """A RedisStore on ``url`` (``publish_timeout`` 3 s unless given), :func:`attached`."""
    options.setdefault("publish_timeout", 3)
    return attached(RedisStore.from_url(url, **options))
