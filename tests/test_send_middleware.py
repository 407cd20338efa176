"""Middleware around the ASGI ``send`` and one stuck subscriber: the publisher must not notice.

An app's ASGI stack may wrap every WebSocket ``send`` with code that binds to
the task it runs in: a timeout (``asyncio.timeout`` cancels the task that
entered it), a ContextVar set before the send and reset after it (a reset must
happen in the context that set it), a tracing middleware. A send that has to
wait must therefore run in a task of the connection, never be stepped inside
the publisher's task (the bug of issue 14: a send-timeout middleware cancelled
the publisher after 1.7k of 3k events; a ContextVar reset dropped the slow
connection).

Each test runs three clients of a real Starlette app with real middleware,
driven in-process over raw ASGI: two read promptly, one is *stuck* (its send
waits, as uvicorn's does on a full socket buffer) while the publisher keeps
publishing.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starlette_replay import MemoryStore, Replay, allow_all

pytestmark = pytest.mark.anyio

EVENTS = 400
TIMEOUT = 10.0


class Peer:
    """One client of the app over raw ASGI. Its ``send`` (the server's transport) waits while ``stuck``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.to_app, self.inbox = anyio.create_memory_object_stream[Message](16)
        self.events: list[int] = []
        self.replies: list[dict[str, Any]] = []
        self.accepted = anyio.Event()
        self.ended = anyio.Event()  # the app returned for this socket
        self.stuck = False
        self.unstuck = anyio.Event()
        self.stalled = anyio.Event()  # a send waited
        self.seen_vars: list[str | None] = []  # send_id as the transport saw it, per frame
        self._changed = anyio.Event()  # set (and replaced) on every frame and at the end
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "scheme": "ws",
            "http_version": "1.1",
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver")],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1),
            "subprotocols": [],
            "extensions": {},
            "state": {},
        }

    async def receive(self) -> Message:
        try:
            return await self.inbox.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return {"type": "websocket.disconnect", "code": 1000}

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            self.accepted.set()
        elif message["type"] == "websocket.send":
            if self.stuck:
                self.stalled.set()
                await self.unstuck.wait()
            self.seen_vars.append(send_id.get())
            frame = json.loads(message["text"])
            if frame["type"] == "event":
                self.events.append(frame["offset"])
            else:
                self.replies.append(frame)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, checked after each frame and at the end (bounded by the caller)."""
        while not condition():
            await self._changed.wait()

    async def serve(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        finally:
            self.ended.set()
            self._notify()

    async def subscribe(self, topic: str) -> None:
        await self.to_app.send({"type": "websocket.connect"})
        await self.to_app.send({"type": "websocket.receive", "text": json.dumps({"type": "subscribe", "topic": topic})})
        with anyio.fail_after(TIMEOUT):
            await self.until(lambda: any(reply["type"] == "subscribed" for reply in self.replies))


class SendTimeout:
    """Bounds every WebSocket send, as apps do to shed stuck clients."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_within(message: Message) -> None:
            async with asyncio.timeout(self.timeout):
                await send(message)

        await self.app(scope, receive, send_within if scope["type"] == "websocket" else send)


send_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("send_id", default=None)


class SendTracing:
    """Sets a ContextVar for the duration of each send and resets it after, as tracing middleware does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sends = 0

        async def traced_send(message: Message) -> None:
            nonlocal sends
            sends += 1
            token = send_id.set(f"send-{sends}")
            try:
                await send(message)
            finally:
                send_id.reset(token)  # ValueError in another Context than the one that set it

        await self.app(scope, receive, traced_send)


@asynccontextmanager
async def three_clients(replay: Replay, app: ASGIApp) -> AsyncIterator[tuple[Peer, Peer, Peer]]:
    """Two prompt readers and one that will be stuck, subscribed to "t"."""
    peers = Peer("a"), Peer("b"), Peer("stuck")
    try:
        async with replay, anyio.create_task_group() as tg:
            for peer in peers:
                tg.start_soon(peer.serve, app)
                await peer.subscribe("t")
            yield peers
            tg.cancel_scope.cancel()
    finally:
        for peer in peers:
            peer.to_app.close()
            peer.inbox.close()


async def publish_steadily(replay: Replay, n: int, *, after: int = 0, every: float = 0.001) -> None:
    """Publish ``n`` events, about one a millisecond (an open-loop publisher, as in the issue)."""
    for i in range(n):
        await replay.publish("t", "x", {"i": after + i})
        await anyio.sleep(every)


async def test_a_send_timeout_middleware_closes_only_the_stuck_client() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = Starlette(routes=[replay.route("/ws")], middleware=[Middleware(SendTimeout, timeout=0.1)])
    async with three_clients(replay, app) as (a, b, stuck):
        stuck.stuck = True
        with anyio.fail_after(TIMEOUT):
            # The publisher's own task must survive the stuck client's timeout (it was cancelled).
            await publish_steadily(replay, EVENTS)
            await stuck.ended.wait()  # its send timed out: that connection ends
            for peer in (a, b):
                await peer.until(lambda peer=peer: len(peer.events) >= EVENTS)
        assert a.events == b.events == list(range(1, EVENTS + 1))
        assert stuck.stalled.is_set()
        assert replay.stats()["connections"] == 2
        await replay.publish("t", "x", {"i": EVENTS})  # the publisher is still whole
        with anyio.fail_after(TIMEOUT):
            await a.until(lambda: len(a.events) > EVENTS)


async def test_a_contextvar_set_around_send_survives_a_send_that_waits() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = Starlette(routes=[replay.route("/ws")], middleware=[Middleware(SendTracing)])
    async with three_clients(replay, app) as (a, b, stuck):
        stuck.stuck = True
        with anyio.fail_after(TIMEOUT):
            await publish_steadily(replay, EVENTS // 2)
            assert stuck.stalled.is_set()
            stuck.stuck = False
            stuck.unstuck.set()  # a slow client, not a dead one: it reads again
            await publish_steadily(replay, EVENTS // 2, after=EVENTS // 2)
            for peer in (a, b, stuck):
                await peer.until(lambda peer=peer: len(peer.events) >= EVENTS or stuck.ended.is_set())
        assert not stuck.ended.is_set(), "the slow connection was dropped"
        for peer in (a, b, stuck):
            assert peer.events == list(range(1, EVENTS + 1)), peer.name
            # every frame was sent under the value its own send set
            assert all(value is not None and value.startswith("send-") for value in peer.seen_vars), peer.name
        assert replay.stats()["connections"] == 3  # nobody was dropped


async def test_opentelemetry_asgi_middleware_with_a_stuck_client(caplog: pytest.LogCaptureFixture) -> None:
    # OpenTelemetry's own send wrapper ends its span before it awaits the inner
    # send, so alone it does not mind where the send runs (it passed on the old
    # hand-stepped code). Under it, the app bounds its sends, as in the first test:
    # the publisher must complete, and every span must be parented and ended.
    otel_asgi = pytest.importorskip("opentelemetry.instrumentation.asgi")
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    replay = Replay(MemoryStore(), authorize=allow_all)
    inner = Starlette(routes=[replay.route("/ws")], middleware=[Middleware(SendTimeout, timeout=0.1)])
    app = otel_asgi.OpenTelemetryMiddleware(inner, tracer_provider=provider)
    caplog.set_level(logging.ERROR, logger="opentelemetry")
    async with three_clients(replay, app) as (a, b, stuck):
        stuck.stuck = True
        with anyio.fail_after(TIMEOUT):
            await publish_steadily(replay, EVENTS)
            await stuck.ended.wait()
            for peer in (a, b):
                await peer.until(lambda peer=peer: len(peer.events) >= EVENTS)
        assert a.events == b.events == list(range(1, EVENTS + 1))
        assert replay.stats()["connections"] == 2
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")], caplog.text
    spans = exporter.get_finished_spans()
    servers = {span.context.span_id: span for span in spans if span.parent is None}
    assert len(servers) == 3  # one server span per connection, each ended
    sends = [span for span in spans if span.name.endswith("websocket send")]
    assert len(sends) >= 2 * (EVENTS + 1)  # accept, subscribed, every event, to both readers
    for span in sends:
        # each send span is a child of its own connection's server span, not of the publisher's context
        assert span.parent is not None and span.parent.span_id in servers, span
