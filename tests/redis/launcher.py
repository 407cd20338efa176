"""A minimal uvicorn-subprocess launcher for the Redis multi-process tests.

(``tests/servers.py`` from the e2e branch is the general harness; this one only
needs to start the Redis app, wait for ``/health``, SIGKILL and stop.)
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.redis_server import free_port

__all__ = ["UvicornProcess", "uvicorn_factory"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class UvicornProcess:
    """``tests.redis.app:make_app`` under uvicorn on a free 127.0.0.1 port."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.env = env
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> UvicornProcess:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.redis.app:make_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        # Waiting for a process to come up (not a test step): poll /health.
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn not healthy within {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, no close frames."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def uvicorn_factory(tmp_path: Path) -> Iterator[Callable[..., UvicornProcess]]:
    """Start app processes on a Redis: ``uvicorn_factory(redis_url, prefix)``; all stopped at the end."""
    processes: list[UvicornProcess] = []

    def make(redis_url: str, prefix: str) -> UvicornProcess:
        process = UvicornProcess(
            tmp_path / f"uvicorn-{len(processes)}.log", {"REPLAY_REDIS_URL": redis_url, "REPLAY_PREFIX": prefix}
        )
        processes.append(process)
        return process.start()

    try:
        yield make
    finally:
        for process in processes:
            process.stop()
