"""Run an ASGI app in a real uvicorn subprocess on 127.0.0.1, for end-to-end tests.

One :class:`UvicornServer` is one uvicorn process: started with ``python -m
uvicorn`` (by default ``--factory tests.e2e.apps:make_app``, configured through
environment variables, see ``tests/e2e/apps.py``), on a free port, its output
going to a log file. ``start()`` returns once ``GET /health`` answers 200;
``stop()`` sends SIGTERM and SIGKILLs after a timeout; ``kill()`` SIGKILLs at
once; ``restart()`` starts it again on the same port.

The ``uvicorn_servers`` fixture hands out servers that are stopped after the
test. Import it into a ``conftest.py`` together with the report hook, so that a
failing test shows every server's log::

    from tests.servers import pytest_runtest_makereport, uvicorn_servers  # noqa: F401

Everything here is synchronous (subprocess management); from an async test,
call it through ``anyio.to_thread.run_sync`` when other tasks must keep running
meanwhile (the ``a*`` methods do that).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest

__all__ = [
    "REPO_ROOT",
    "ServerError",
    "UvicornServer",
    "free_port",
    "pytest_runtest_makereport",
    "uvicorn_servers",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_APP = "tests.e2e.apps:make_app"
_STASH_SERVERS = pytest.StashKey[list["UvicornServer"]]()
_LOG_TAIL = 20_000  # characters of each server log shown for a failed test


class ServerError(RuntimeError):
    """The server process did not start, or died, or would not stop."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parent_pid(pid: object) -> int | None:
    """The parent of process ``pid`` (Linux /proc), None when it cannot be told."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()  # type: ignore[call-overload]
    except (OSError, TypeError, ValueError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class UvicornServer:
    """One uvicorn process serving ``app`` on ``host:port`` (or, with ``server``, another ASGI server).

    ``server`` is ``uvicorn`` (``ws`` picks its WebSocket implementation),
    ``hypercorn`` (asyncio worker), ``hypercorn-trio``, ``granian`` or
    ``daphne`` (which takes no factory: give it a module-level ``app``).

    ``env`` is added to this process's environment (values are turned into
    strings). ``log_path`` receives the server's stdout and stderr, appended
    across restarts. ``port`` None picks a free one at the first start and keeps
    it for restarts.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        app: str = DEFAULT_APP,
        factory: bool = True,
        env: Mapping[str, object] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        ws: str = "auto",
        server: str = "uvicorn",
        graceful_timeout: int = 3,
        extra_args: tuple[str, ...] = (),
        name: str = "server",
        allow_errors: bool = False,
    ) -> None:
        self.log_path = log_path
        self.app = app
        self.factory = factory
        self.env = {key: str(value) for key, value in (env or {}).items()}
        self.host = host
        self.port = port
        self.ws = ws
        if server not in ("uvicorn", "hypercorn", "hypercorn-trio", "granian", "daphne"):
            raise ValueError(f"unknown server {server!r}")
        self.server = server
        self.graceful_timeout = graceful_timeout
        self.extra_args = extra_args
        self.name = name
        self.allow_errors = allow_errors
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"UvicornServer({self.name!r}, port={self.port}, pid={pid})"

    # --- addresses -----------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        return f"http://{self.host}:{self._port()}"

    def ws_url(self, path: str = "/ws") -> str:
        """``ws://host:port/path``."""
        return f"ws://{self.host}:{self._port()}{path}"

    @property
    def origin(self) -> str:
        """The same-origin ``Origin`` a browser on this server's pages would send."""
        return self.http_url

    def _port(self) -> int:
        if self.port is None:
            raise ServerError(f"{self.name} has no port yet: start it first")
        return self.port

    # --- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _command(self, port: int) -> list[str]:
        if self.server.startswith("hypercorn"):
            app = f"{self.app}()" if self.factory else self.app
            command = [sys.executable, "-m", "hypercorn", app, "--bind", f"{self.host}:{port}"]
            if self.server == "hypercorn-trio":
                command += ["--worker-class", "trio"]
            return [*command, "--graceful-timeout", str(self.graceful_timeout), *self.extra_args]
        if self.server == "daphne":
            if self.factory:
                raise ServerError("daphne takes no app factory: give app='module:app' and factory=False")
            return [sys.executable, "-m", "daphne", "-b", self.host, "-p", str(port), *self.extra_args, self.app]
        if self.server == "granian":
            command = [sys.executable, "-m", "granian", "--interface", "asgi", self.app]
            command += ["--host", self.host, "--port", str(port), "--log-level", "info", *self.extra_args]
            return [*command, "--factory"] if self.factory else command
        command = [sys.executable, "-m", "uvicorn", self.app, "--host", self.host, "--port", str(port)]
        if self.factory:
            command.append("--factory")
        command += [
            "--ws",
            self.ws,
            "--log-level",
            "info",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            str(self.graceful_timeout),
            *self.extra_args,
        ]
        return command

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and return once ``GET /health`` answers 200.

        Raises :class:`ServerError` when the process exits first or does not
        answer within ``timeout`` seconds (it is then killed). With a port picked
        here, a port taken meanwhile by someone else is retried on another one.
        """
        if self.running:
            raise ServerError(f"{self.name} is already running")
        attempts = 3 if self.port is None else 1
        for attempt in range(attempts):
            port = self.port if self.port is not None else free_port(self.host)
            try:
                self._spawn(port, timeout)
            except ServerError:
                if attempt + 1 == attempts or "address already in use" not in self.log_tail(2000).lower():
                    raise
                continue
            self.port = port
            return

    def _spawn(self, port: int, timeout: float) -> None:
        env = {**os.environ, "REPLAY_PARENT_PID": str(os.getpid()), **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self._command(port))}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self._command(port),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise ServerError(f"{self.name} exited with {code} while starting; log:\n{self.log_tail(4000)}")
            if self._healthy(self.host, port, self.process.pid):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"{self.name} did not answer /health within {timeout}s; log:\n{self.log_tail(4000)}")
            time.sleep(0.05)  # polling a process we do not control: nothing to wait on

    @staticmethod
    def _healthy(host: str, port: int, pid: int) -> bool:
        """``GET /health`` answers 200 (and, when it tells a ``pid``, from our process, not a stranger)."""
        conn = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        except OSError:
            return False
        finally:
            conn.close()
        if response.status != 200:
            return False
        try:
            told = json.loads(body).get("pid", pid)
        except (ValueError, AttributeError):
            return True
        # hypercorn and granian serve from a worker process of the one we started
        return bool(told == pid or _parent_pid(told) == pid)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code (None if not running)."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._append_log(f"--- {self.name} did not stop within {timeout}s of SIGTERM: SIGKILL\n")
                process.kill()
                process.wait(5.0)
        self.process = None
        return process.returncode

    def terminate(self) -> None:
        """Send SIGTERM and return at once (the process shuts down gracefully meanwhile)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; returns its exit code. Raises ``ServerError`` on timeout."""
        if self.process is None:
            raise ServerError(f"{self.name} is not running")
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{self.name} still running after {timeout}s") from None
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the process now (a crash: no close frames, no lifespan shutdown)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(5.0)
        self._append_log(f"--- {self.name} killed (SIGKILL)\n")
        self.process = None

    def restart(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill``) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    # async wrappers: the blocking work runs in a worker thread so the test's other tasks go on

    # (``within`` bounds the blocking call itself: a worker thread cannot be cancelled)

    async def astart(self, within: float = 20.0) -> None:
        """:meth:`start` in a worker thread."""
        await anyio.to_thread.run_sync(lambda: self.start(within))

    async def astop(self, within: float = 10.0) -> int | None:
        """:meth:`stop` in a worker thread."""
        return await anyio.to_thread.run_sync(lambda: self.stop(within))

    async def await_exit(self, within: float = 10.0) -> int:
        """:meth:`wait` in a worker thread."""
        return await anyio.to_thread.run_sync(lambda: self.wait(within))

    async def arestart(self, *, kill: bool = False, within: float = 20.0) -> None:
        """:meth:`restart` in a worker thread."""
        await anyio.to_thread.run_sync(lambda: self.restart(kill=kill, timeout=within))

    def __enter__(self) -> UvicornServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the log ---------------------------------------------------------------------

    def _append_log(self, text: str) -> None:
        with self.log_path.open("a") as log:
            log.write(text)

    def log_text(self) -> str:
        """Everything the server printed so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_errors(self) -> list[str]:
        """Log lines that tell of a server-side failure: tracebacks and ERROR/CRITICAL records."""
        markers = ("Traceback (most recent call last)", "ERROR:", "CRITICAL:")
        return [line for line in self.log_text().splitlines() if any(m in line for m in markers)]

    def log_tail(self, chars: int = _LOG_TAIL) -> str:
        text = self.log_text()
        return text if len(text) <= chars else "...\n" + text[-chars:]


ServerFactory = Callable[..., UvicornServer]


@pytest.fixture
def uvicorn_servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory: ``uvicorn_servers(env={...}, name=..., start=True, **kwargs) -> UvicornServer``.

    Each server logs to ``tmp_path / f"{name}.log"``; every server is stopped
    after the test, and a failing test shows their logs (with the report hook).
    A server whose log shows a traceback or an ERROR record fails the test at
    teardown, unless it was made with ``allow_errors=True``.
    """
    servers: list[UvicornServer] = []
    request.node.stash[_STASH_SERVERS] = servers

    def make(*, name: str | None = None, start: bool = True, **kwargs: Any) -> UvicornServer:
        name = name or f"server{len(servers) + 1}"
        server = UvicornServer(tmp_path / f"{name}.log", name=name, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
    errors = {server.name: server.log_errors() for server in servers if not server.allow_errors}
    errors = {name: lines for name, lines in errors.items() if lines}
    if errors:
        pytest.fail(f"server-side errors in the logs (allow_errors=True if expected): {errors}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Add every server's log to the report of a failed test phase."""
    report = yield
    if report.failed:
        for server in item.stash.get(_STASH_SERVERS, []):
            report.sections.append((f"uvicorn log: {server.name} ({server.log_path})", server.log_tail()))
    return report
