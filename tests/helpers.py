"""In-process client helpers: one httpx-ws transport per client, lifespan run by asgi-lifespan."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from asgi_lifespan import LifespanManager
from httpx_ws import WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

from starlette_replay import Replay

TIMEOUT = 5.0


def make_app(replay: Replay, path: str = "/ws") -> Starlette:
    """A plain Starlette app serving ``replay`` at ``path`` with its lifespan."""
    return Starlette(routes=[replay.route(path)], lifespan=replay.lifespan)


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[Any]:
    """Run ``app``'s lifespan; yields the app to connect clients to."""
    async with LifespanManager(app) as manager:
        yield manager.app


class Client:
    """A test-side WebSocket client speaking JSON frames."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @property
    def subprotocol(self) -> str | None:
        value: str | None = self.ws.subprotocol
        return value

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any]:
        """The next frame as a dict; raises TimeoutError or WebSocketDisconnect."""
        text = await self.ws.receive_text(timeout=within)
        frame: dict[str, Any] = json.loads(text)
        return frame

    async def recv_type(self, kind: str, within: float = TIMEOUT) -> dict[str, Any]:
        """The next frame, asserting its type (server heartbeat pings are not skipped)."""
        frame = await self.recv(within)
        assert frame["type"] == kind, frame
        return frame

    async def request(self, frame: dict[str, Any], within: float = TIMEOUT) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv(within)

    async def subscribe(self, topic: str, within: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send a subscribe and return the ``subscribed`` reply (asserting it is one)."""
        reply = await self.request({"type": "subscribe", "topic": topic, **fields}, within)
        assert reply["type"] == "subscribed", reply
        return reply

    async def events(self, n: int, within: float = TIMEOUT) -> list[dict[str, Any]]:
        """The next ``n`` frames, asserting each is an event."""
        out = []
        with anyio.fail_after(within):
            for _ in range(n):
                out.append(await self.recv_type("event", within))
        return out

    async def closed(self, within: float = TIMEOUT) -> int:
        """Read frames until the server closes; returns the close code."""
        with anyio.fail_after(within):
            while True:
                try:
                    await self.ws.receive(timeout=within)
                except WebSocketDisconnect as exc:
                    code: int = exc.code
                    return code

    async def nothing_pending(self) -> None:
        """Assert no frame is waiting: a ping round-trip comes back first (frames are ordered)."""
        reply = await self.request({"type": "ping", "ref": "__barrier__"})
        assert reply == {"type": "pong", "ref": "__barrier__"}, reply


@asynccontextmanager
async def connect(
    app: Any,
    path: str = "/ws",
    *,
    subprotocols: Sequence[str] | None = ("replay.v1",),
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Client]:
    """Connect one client with its own transport (httpx-ws shares a scope per transport).

    Subprotocols are sent without spaces after the commas: httpx-ws splits the
    header on "," without stripping.
    """
    all_headers = dict(headers or {})
    if subprotocols:
        all_headers["sec-websocket-protocol"] = ",".join(subprotocols)
    transport = ASGIWebSocketTransport(app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
        aconnect_ws(f"http://testserver{path}", http, headers=all_headers) as ws,
    ):
        yield Client(ws)


def _leaves(exc: BaseException) -> list[BaseException]:
    inner: list[BaseException] | None = getattr(exc, "exceptions", None)  # an exception group
    if inner is not None:
        return [leaf for child in inner for leaf in _leaves(child)]
    return [exc]


async def refused_handshake(app: Any, path: str = "/ws", **kwargs: Any) -> WebSocketDisconnect:
    """Connect and expect the server to refuse before accepting; returns the close it sent."""
    try:
        async with connect(app, path, **kwargs):
            pass
    except BaseException as exc:  # the transport wraps it in an ExceptionGroup
        for leaf in _leaves(exc):
            if isinstance(leaf, WebSocketDisconnect):
                return leaf
        raise
    raise AssertionError("the handshake was accepted")


@asynccontextmanager
async def lifespan_of(app: Any) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Run ``app``'s ASGI lifespan in a task of its own; yields ``shutdown()``.

    Unlike asgi-lifespan's manager, shutdown can be triggered from inside other
    contexts (open clients): the lifespan task does the work, as under a server.
    Shutdown runs on exit if it was not triggered.
    """
    to_app, app_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    to_test, test_inbox = anyio.create_memory_object_stream[dict[str, Any]](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    stopped = False

    async def shutdown() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        with anyio.fail_after(TIMEOUT):
            await to_app.send({"type": "lifespan.shutdown"})
            message = await test_inbox.receive()
        assert message["type"] == "lifespan.shutdown.complete", message

    async with anyio.create_task_group() as tg, to_app, app_inbox, to_test, test_inbox:
        tg.start_soon(app, scope, app_inbox.receive, to_test.send)
        with anyio.fail_after(TIMEOUT):
            await to_app.send({"type": "lifespan.startup"})
            message = await test_inbox.receive()
        assert message["type"] == "lifespan.startup.complete", message
        try:
            yield shutdown
        finally:
            with anyio.CancelScope(shield=True):
                await shutdown()


# --- a fake socket, for tests at the Connection level ---------------------------------------------------


async def serve_fake(replay: Replay, ws: FakeWebSocket, name: str) -> None:
    """What the endpoint does after accept, with a fake socket."""
    connection = replay._connect(ws, None, name)  # type: ignore[arg-type]
    await replay._registry.serve(connection)


class FakeWebSocket:
    """Just what Connection uses; ``send`` blocks while ``stalled``."""

    def __init__(self) -> None:
        self.fail = False  # send raises, as when the peer is gone
        self.senders: list[asyncio.Task[Any] | None] = []  # the task that sent each frame
        self.inbox_send: MemoryObjectSendStream[dict[str, Any]]
        self.inbox: MemoryObjectReceiveStream[dict[str, Any]]
        self.inbox_send, self.inbox = anyio.create_memory_object_stream[dict[str, Any]](100)
        self.sent: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.stalled = False
        self.unstall = anyio.Event()
        self.got_frame = anyio.Event()
        self.closed_with: tuple[int, str] | None = None
        self.closed = anyio.Event()
        self.send_attempted = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        try:
            return await self.inbox.receive()
        except anyio.EndOfStream:
            return {"type": "websocket.disconnect", "code": 1000}

    async def send(self, message: dict[str, Any]) -> None:
        assert message["type"] == "websocket.send", message
        text = message["text"]
        if self.fail:
            raise OSError("peer gone")
        self.senders.append(asyncio.current_task())
        self.send_attempted.set()
        self.texts.append(text)  # what the connection tried to send, sent or not
        if self.stalled:
            await self.unstall.wait()
        self.sent.append(json.loads(text))
        self.got_frame.set()
        self.got_frame = anyio.Event()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = (code, reason or "")
        self.closed.set()

    def close_streams(self) -> None:
        self.inbox_send.close()
        self.inbox.close()

    async def client_sends(self, frame: dict[str, Any]) -> None:
        await self.inbox_send.send({"type": "websocket.receive", "text": json.dumps(frame)})

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        """Wait until ``n`` frames were sent."""
        with anyio.fail_after(TIMEOUT):
            while len(self.sent) < n:
                await self.got_frame.wait()
        return self.sent
