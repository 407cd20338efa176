"""Fixtures for real-browser tests: the demo app in a uvicorn subprocess, headless Chromium via Playwright.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/system-deps``);
Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]


class DemoServer:
    """``python -m example_app`` serving a listening socket that this object keeps.

    The socket is bound once (port 0, so no race for a free port) and handed to
    each server process, so :meth:`restart` keeps the address: connections made
    while no process runs wait in the backlog.
    """

    def __init__(
        self,
        tmp_path: Path,
        agent_delay: float,
        heartbeat: float = 25.0,
        redis_url: str | None = None,
        token_rate: float = 50.0,
    ) -> None:
        self.redis_url = redis_url
        self.token_rate = token_rate
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.tmp_path = tmp_path
        self.agent_delay = agent_delay
        self.heartbeat = heartbeat
        self.runs = 0
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None

    @property
    def log(self) -> Path:
        return self.tmp_path / f"server-{self.sock.getsockname()[1]}-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        if self.redis_url is not None:
            env["REDIS_URL"] = self.redis_url
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "example_app", "--fd", str(fd)]
        cmd += ["--agent-delay", str(self.agent_delay), "--heartbeat", str(self.heartbeat)]
        cmd += ["--token-rate", str(self.token_rate)]
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, pass_fds=[fd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.proc = proc
        started = threading.Event()
        log = self.log

        def pump() -> None:
            # Copies the server's log to a file and notices when startup is complete.
            assert proc.stderr is not None
            with log.open("w") as out:
                for line in proc.stderr:
                    out.write(line)
                    out.flush()
                    if "Application startup complete" in line:
                        started.set()

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()
        if not started.wait(timeout=30):
            self.stop()
            pytest.fail(f"the demo app did not start within 30 s:\n{log.read_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test left it paused
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if self.reader is not None:
            self.reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): its sockets stay open and silent, like a dead network path."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop the server (uvicorn closes sockets with 1012) and start a new one: a new memory store."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self.sock.close()


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """The demo app with a 1 s agent delay, on 127.0.0.1 and a port of its own."""
    server = DemoServer(tmp_path, agent_delay=1.0)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def stream_server(tmp_path: Path) -> Iterator[DemoServer]:
    """The demo app streaming 8 tokens/s: an answer (40 tokens) takes 5 s, time to act in the middle of it
    even on a loaded machine (a reload, a drop and reconnect)."""
    server = DemoServer(tmp_path, agent_delay=0.3, token_rate=8.0)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def quiet_server(tmp_path: Path) -> Iterator[DemoServer]:
    """The demo app with a 0.5 s heartbeat: a page notices a silent socket within a second."""
    server = DemoServer(tmp_path, agent_delay=0.5, heartbeat=0.5)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Debian Chromium driven by Playwright (never a downloaded browser)."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: `make system` (or apt-get install chromium) installs it")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()
