"""Fixtures for real-browser tests: the demo app in a uvicorn subprocess, headless Chromium via Playwright.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/system-deps``);
Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class DemoServer:
    url: str
    log: Path


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """``python -m example_app`` on a socket bound here (port 0: no race for a port), agent delay 1 s."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_app", "--fd", str(sock.fileno()), "--agent-delay", "1.0"],
        cwd=REPO,
        env=env,
        pass_fds=[sock.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sock.close()  # the child holds it now
    started = threading.Event()

    def pump() -> None:
        # Copies the server's log to a file and notices when startup is complete.
        assert proc.stderr is not None
        with log.open("w") as out:
            for line in proc.stderr:
                out.write(line)
                out.flush()
                if "Application startup complete" in line:
                    started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not started.wait(timeout=30):
            pytest.fail(f"the demo app did not start within 30 s:\n{log.read_text()}")
        yield DemoServer(f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        reader.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
async def browser() -> AsyncIterator[object]:
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
