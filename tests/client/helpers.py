"""Servers for the client tests: real uvicorn on 127.0.0.1, fake protocol peers, a TCP proxy that can be cut."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from anyio.abc import SocketStream
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from starlette_replay import Replay
from starlette_replay.client import Item, ReplayClient

TIMEOUT = 10


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def listening_socket(port: int = 0) -> socket.socket:
    """A bound, listening socket: connections queue in its backlog until uvicorn serves them.

    ``proto=IPPROTO_TCP`` matters: asyncio sets TCP_NODELAY only on sockets whose
    proto says TCP, and without it Nagle + delayed ACKs stall small frames by 40 ms.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def free_port() -> int:
    """A port nothing listens on right now (for a server that starts, stops and starts again there)."""
    with listening_socket() as sock:
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def serve(app: ASGIApp, port: int = 0) -> AsyncIterator[int]:
    """Run ``app`` on uvicorn in this event loop; yields the port once the app's lifespan started.

    Shuts uvicorn down (it closes open WebSockets with 1012) on exit.
    """
    started = anyio.Event()

    async def app_started(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_and_tell(message: Message) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await app(scope, receive, send_and_tell if scope["type"] == "lifespan" else send)

    sock = listening_socket(port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_started, lifespan="on", log_config=None, access_log=False))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            with anyio.fail_after(TIMEOUT):
                await started.wait()
            yield port
        finally:
            server.should_exit = True


def replay_app(replay: Replay, *, lifespan: bool = True) -> Starlette:
    return Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan if lifespan else None)


def abort_all(replay: Replay, code: int, reason: str = "test") -> int:
    """Close every server-side connection of ``replay`` with ``code``; returns how many."""
    connections = list(replay._registry.connections)
    for connection in connections:
        connection.abort(code, reason)
    return len(connections)


async def take(client: ReplayClient, n: int) -> list[Item]:
    """The next ``n`` items of ``client``."""
    items: list[Item] = []
    with anyio.fail_after(TIMEOUT):
        while len(items) < n:
            items.append(await client.__anext__())
    return items


# --- a fake protocol peer ------------------------------------------------------------------


class Peer:
    """The server side of one connection to a :class:`FakeServer`, driven by a test script."""

    def __init__(self, websocket: WebSocket, number: int) -> None:
        self.ws = websocket
        self.number = number
        self.received: list[dict[str, Any]] = []

    @property
    def headers(self) -> Any:
        return self.ws.headers

    async def accept(self) -> None:
        await self.ws.accept(subprotocol="replay.v1")

    async def recv(self) -> dict[str, Any]:
        with anyio.fail_after(TIMEOUT):
            frame: dict[str, Any] = json.loads(await self.ws.receive_text())
        self.received.append(frame)
        return frame

    async def send(self, **frame: Any) -> None:
        await self.ws.send_text(json.dumps(frame))

    async def subscribed(
        self,
        request: dict[str, Any],
        epoch: str,
        head: int,
        *,
        resumed: bool = False,
        recovered: bool = False,
        replayed: int = 0,
    ) -> None:
        await self.send(
            type="subscribed",
            topic=request["topic"],
            epoch=epoch,
            offset=head,
            resumed=resumed,
            recovered=recovered,
            replayed=replayed,
            ref=request["ref"],
        )

    async def event(self, topic: str, offset: int, data: Any = None, event: str = "e") -> None:
        await self.send(type="event", topic=topic, offset=offset, event=event, data=data, time=1000 + offset)

    async def until_closed(self) -> None:
        """Read (and keep) frames until the client goes away."""
        with anyio.fail_after(TIMEOUT):
            try:
                while True:
                    self.received.append(json.loads(await self.ws.receive_text()))
            except WebSocketDisconnect:
                pass


Script = Callable[[Peer], Awaitable[None]]


class FakeServer:
    """A raw Starlette WebSocket route: the n-th connection runs ``scripts[n]`` (the last one repeats).

    Failures inside a script are kept in ``errors`` (uvicorn would only log them).
    """

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.connected = anyio.Event()
        self.app = Starlette(routes=[WebSocketRoute("/ws", self._endpoint)])

    async def _endpoint(self, websocket: WebSocket) -> None:
        peer = Peer(websocket, len(self.peers))
        self.peers.append(peer)
        self.connected.set()
        self.connected = anyio.Event()
        script = self.scripts[min(peer.number, len(self.scripts) - 1)]
        try:
            await script(peer)
        except WebSocketDisconnect:
            pass
        except Exception as exc:
            self.errors.append(exc)
            raise


# --- a TCP proxy that can be cut ---------------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` drops every connection without a close frame."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self._scopes: set[anyio.CancelScope] = set()

    def cut(self) -> int:
        scopes = list(self._scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def handle(self, client: SocketStream) -> None:
        self.accepted += 1
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with client, await anyio.connect_tcp("127.0.0.1", self.target) as upstream:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
                        tg.start_soon(_pipe, upstream, client, tg.cancel_scope)
            finally:
                self._scopes.discard(scope)


async def _pipe(source: SocketStream, sink: SocketStream, scope: anyio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    scope.cancel()


@asynccontextmanager
async def tcp_proxy(target: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy.handle)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
