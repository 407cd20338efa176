"""The client under trio (through anyio), against a real server on asyncio in a thread of its own.

Runs where trio is installed (``pip install trio``); websockets 16 and later have a trio
implementation, which the client picks when the running loop is trio's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
import uvicorn

from starlette_replay import CloseCode, Event, MemoryStore, Replay, allow_all
from starlette_replay.client import Backoff, ReplayClient, Reset

from .helpers import TIMEOUT, FakeServer, Peer, abort_all, listening_socket, replay_app, url

trio = pytest.importorskip("trio")


@contextmanager
def server_thread(replay: Replay | None, app: Any = None) -> Iterator[tuple[int, asyncio.AbstractEventLoop]]:
    """uvicorn serving ``replay`` (or ``app``) in a thread; yields its port and event loop once started."""
    app = replay_app(replay) if replay is not None else app
    started = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def app_started(scope: Any, receive: Any, send: Any) -> None:
        async def send_and_tell(message: Any) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                loops.append(asyncio.get_running_loop())
                started.set()

        await app(scope, receive, send_and_tell if scope["type"] == "lifespan" else send)

    sock = listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_started, lifespan="on", log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert started.wait(TIMEOUT), "the server did not start"
        yield port, loops[0]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


async def _abort(replay: Replay) -> int:
    return abort_all(replay, CloseCode.SERVICE_RESTART)


def test_the_client_runs_under_trio_and_resumes_after_a_reconnect() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    with server_thread(replay) as (port, loop):

        async def main() -> list[Event | Reset]:
            items: list[Event | Reset] = []
            async with ReplayClient(url(port), backoff=Backoff(initial=0.01, max=0.05)) as client:
                with anyio.fail_after(TIMEOUT):
                    await client.subscribe("t")
                    await anyio.to_thread.run_sync(replay.publish_sync, "t", "n", 1)
                    items.append(await client.__anext__())
                    # The server restarts the connection (1012); once that is done, a subscribe can
                    # only be confirmed on the next connection, which resumes "t" from its cursor.
                    aborted = asyncio.run_coroutine_threadsafe(_abort(replay), loop)
                    assert await anyio.to_thread.run_sync(aborted.result, TIMEOUT) == 1
                    await client.subscribe("u")
                    assert client.connections == 2
                    await anyio.to_thread.run_sync(replay.publish_sync, "t", "n", 2)
                    items.append(await client.__anext__())
            return items

        items = trio.run(main)
    assert [(type(i), i.offset) for i in items] == [(Event, 1), (Event, 2)]


def test_a_silent_socket_is_dropped_under_trio() -> None:
    """No frame for twice the heartbeat interval: the trio stream is dropped and the client resumes."""

    async def silent(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        await peer.until_closed()

    async def healthy(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        assert (request["epoch"], request["offset"], request["time"]) == ("e1", 1, 1001)
        await peer.subscribed(request, "e1", 2, resumed=True, recovered=True, replayed=1)
        await peer.event("t", 2)
        await peer.until_closed()

    fake = FakeServer(silent, healthy)
    with server_thread(None, fake.app) as (port, _):

        async def main() -> list[Event | Reset]:
            fast = Backoff(initial=0.01, max=0.05)
            async with ReplayClient(url(port), topics=["t"], heartbeat_interval=0.25, backoff=fast) as client:
                with anyio.fail_after(TIMEOUT):
                    return [await client.__anext__(), await client.__anext__()]

        items = trio.run(main)
    assert not fake.errors
    assert [(type(i), i.offset) for i in items] == [(Event, 1), (Event, 2)]
    assert len(fake.peers) == 2


def test_under_trio_an_old_websockets_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import starlette_replay.client as client_module

    real = importlib.import_module

    def without_trio(name: str) -> Any:
        if name == "websockets.trio.client":
            raise ImportError("No module named 'websockets.trio'")
        return real(name)

    monkeypatch.setattr(client_module.importlib, "import_module", without_trio)

    async def main() -> None:
        async with ReplayClient("ws://127.0.0.1:9/ws"):
            pass

    with pytest.raises(ImportError, match="websockets >= 16"):
        trio.run(main)
