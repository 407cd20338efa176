"""The app-facing object: configuration, lifecycle, the route, publishing."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ._checks import check_int, check_positive, check_seconds
from .connection import Authorize, Connection, Limits
from .endpoint import Endpoint, Identify
from .errors import NotRunning, ReplayError
from .events import Event
from .hub import Hub
from .metrics import Metrics, ReplayCollector
from .protocol import CloseCode, check_topic
from .publisher import Publisher, RunningLoop
from .registry import Registry
from .sse import SSEEndpoint
from .stores.base import Cursor, EventStore, Health, HealthCheck, Position
from .stores.memory import MemoryStore

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Authorize", "Identify", "Replay", "Snapshot", "allow_all"]

logger = logging.getLogger("starlette_replay.replay")

T = TypeVar("T")


_SNAPSHOT_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A topic's newest retained events and the cursor to subscribe from after them."""

    topic: str
    epoch: str
    head: int
    events: list[Event]
    complete: bool  # False: more events were retained than the limit asked for

    @property
    def cursor(self) -> Cursor:
        """``(epoch, head)``: subscribe from here to get what follows the snapshot."""
        return Cursor(self.epoch, self.head)


def allow_all(conn: HTTPConnection, topic: str) -> bool:
    """An ``authorize`` hook that allows every topic: for demos and tests only."""
    return True


class Replay:
    """A lossless push route (WebSocket, and Server-sent events) backed by an event store.

    See ``README.md`` for every option. The Replay owns its store: it connects it
    on start and closes it (``store.aclose()``) on shutdown.
    """

    def __init__(
        self,
        store: EventStore | None = None,
        *,
        authorize: Authorize | None = None,
        identify: Identify | None = None,
        allowed_origins: Sequence[str] | None = None,
        send_queue_size: int = 1024,
        max_message_size: int = 65536,
        max_subscriptions: int = 100,
        heartbeat_interval: float = 25.0,
        max_event_size: int = 1024 * 1024,
        replay_page_size: int = 500,
        max_bad_frames: int = 100,
        bad_frames_window: float = 60.0,
        max_frame_rate: float = 100.0,
        frame_burst: int = 200,
        close_timeout: float = 5.0,
        max_connections_per_identity: int | None = None,
        sse_retry: int = 2000,
    ) -> None:
        for name, value in (
            ("send_queue_size", send_queue_size),
            ("max_message_size", max_message_size),
            ("max_subscriptions", max_subscriptions),
            ("max_event_size", max_event_size),
            ("replay_page_size", replay_page_size),
            ("max_bad_frames", max_bad_frames),
            ("frame_burst", frame_burst),
            ("sse_retry", sse_retry),
        ):
            check_int(name, value)
        for name, seconds in (
            ("heartbeat_interval", heartbeat_interval),
            ("bad_frames_window", bad_frames_window),
            ("close_timeout", close_timeout),
        ):
            check_seconds(name, seconds)
        check_positive("max_frame_rate", max_frame_rate, unit="frames per second")
        if isinstance(allowed_origins, str):
            raise TypeError('allowed_origins must be a list of origins, e.g. ["https://example.com"], not a string')
        if store is not None and not isinstance(store, EventStore):
            raise TypeError(f"store must implement EventStore, got {type(store).__name__}")
        self.store: EventStore = store if store is not None else MemoryStore()
        self.authorize = authorize
        self.identify = identify
        self.allowed_origins = None if allowed_origins is None else [o.rstrip("/") for o in allowed_origins]
        self.max_event_size = max_event_size
        if max_connections_per_identity is not None:
            check_int("max_connections_per_identity", max_connections_per_identity)
        self.max_connections_per_identity = max_connections_per_identity
        self.limits = Limits(
            send_queue_size=send_queue_size,
            max_message_size=max_message_size,
            max_subscriptions=max_subscriptions,
            heartbeat_interval=heartbeat_interval,
            replay_page_size=replay_page_size,
            max_bad_frames=max_bad_frames,
            bad_frames_window=bad_frames_window,
            max_frame_rate=max_frame_rate,
            frame_burst=frame_burst,
            close_timeout=close_timeout,
        )
        self.metrics = Metrics()  # the counters the parts bump; read by collector() at scrape time
        self.hub = Hub(self.store, self.metrics)
        self._loop = RunningLoop()
        self._publisher = Publisher(self.store, self.hub, self._loop, max_event_size=max_event_size)
        self._registry = Registry(
            max_per_identity=max_connections_per_identity, close_timeout=close_timeout, metrics=self.metrics
        )
        self._endpoint = Endpoint(
            allowed_origins=self.allowed_origins,
            identify=identify,
            registry=self._registry,
            connect=self._connect,
        )
        self._sse = SSEEndpoint(
            endpoint=self._endpoint,
            registry=self._registry,
            hub=self.hub,
            store=self.store,
            limits=self.limits,
            authorize=authorize,
            retry=sse_retry,
        )
        self._stack: AsyncExitStack | None = None
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"Replay(store={self.store!r}, running={self.running})"

    # --- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._stack is not None

    def _check_running(self) -> None:
        if self._stack is None:
            raise NotRunning(
                "the Replay is not running: pass lifespan=replay.lifespan to the app, or use `async with replay:`"
            )

    async def __aenter__(self) -> Replay:
        """Connect the store and start serving. Raises ``RuntimeError`` if already started."""
        if self._stack is not None:
            raise RuntimeError("this Replay is already running")
        async with AsyncExitStack() as stack:
            # Entered around the store's context so that aclose() can shield it:
            # a task group inside that context must be exited as the innermost scope.
            scope = stack.enter_context(anyio.CancelScope())
            await stack.enter_async_context(self.store.connect(self.hub))
            heartbeat = await stack.enter_async_context(anyio.create_task_group())
            heartbeat.start_soon(self._heartbeat)
            stack.callback(heartbeat.cancel_scope.cancel)  # unwound first: stops the loop
            self._loop.token = anyio.lowlevel.current_token()
            self._loop.thread = threading.get_ident()
            self._scope = scope
            self._stack = stack.pop_all()
            self._registry.accepting = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _heartbeat(self) -> None:
        """Queue a ``ping`` on every connection idle for ``heartbeat_interval``.

        One timer for all connections: a writer waits for frames without a
        timeout of its own, which keeps the per-frame wake-up cheap. A ping goes
        out between 1 and 1.25 intervals of silence.
        """
        interval = self.limits.heartbeat_interval
        while True:
            await anyio.sleep(interval / 4)
            now = time.monotonic()
            for connection in self._registry.connections:
                connection.heartbeat(now, interval)

    async def aclose(self) -> None:
        """Close every open connection with 1001, then the store. Safe to call twice.

        Call it from the task that started the Replay (the lifespan and
        ``async with`` do): the store's background tasks belong to that task, and
        anyio refuses to end them from another (``RuntimeError``). Shielded from
        cancellation; waits at most ``close_timeout + 1`` s for connections.
        """
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._loop.token = None
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.shield = True
        with anyio.CancelScope(shield=True):
            await self._registry.close_all(CloseCode.GOING_AWAY, "server shutting down")
        try:
            # Not inside a new shielding scope (a task group in the store's context
            # must be exited as the innermost scope): `scope` shields it instead.
            await stack.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.aclose()

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A Starlette/FastAPI lifespan: ``Starlette(..., lifespan=replay.lifespan)``."""
        async with self:
            yield

    def _connect(self, websocket: WebSocket, identity: str | None, conn_id: str) -> Connection:
        """The :class:`Connection` for an accepted socket, with its collaborators (the endpoint calls it)."""
        return Connection(
            websocket,
            identity,
            conn_id,
            hub=self.hub,
            store=self.store,
            limits=self.limits,
            authorize=self.authorize,
        )

    # --- ASGI --------------------------------------------------------------------

    async def endpoint(self, websocket: WebSocket) -> None:
        """The WebSocket endpoint: ``WebSocketRoute("/ws", replay.endpoint)``."""
        await self._endpoint.serve(websocket)

    def route(self, path: str, *, name: str | None = None) -> WebSocketRoute:
        """A ``WebSocketRoute`` serving this Replay at ``path``."""
        return WebSocketRoute(path, self.endpoint, name=name)

    async def sse_endpoint(self, request: Request) -> Response:
        """The Server-sent events endpoint: ``app.add_route("/sse", replay.sse_endpoint)``.

        Returns the response for ``request`` at once, without raising: a
        ``text/event-stream`` of the ``topic`` parameters' frames, or a refusal
        (an HTTP status and a JSON error body) before any stream byte, decided
        when the response runs. See docs/sse.md.
        """
        return self._sse.response(request)

    def sse_route(self, path: str, *, name: str | None = None) -> Route:
        """A ``Route`` serving this Replay's topics as Server-sent events at ``path`` (GET)."""
        return Route(path, self.sse_endpoint, methods=["GET"], name=name)

    def client_route(self, path: str = "/replay.js", *, name: str | None = None) -> Route:
        """A route that serves the browser client, an ES module (``static/replay.js``)."""
        source = resources.files("starlette_replay").joinpath("static/replay.js").read_bytes()

        async def replay_js(request: Request) -> Response:
            return Response(
                source,
                media_type="text/javascript",
                headers={"cache-control": "no-cache"},
            )

        return Route(path, replay_js, methods=["GET", "HEAD"], name=name)

    def health_route(self, path: str = "/health", *, name: str | None = None) -> Route:
        """A route answering :meth:`health` as JSON: 200 when ready, 503 when not.

        The body is ``{"ready": bool, "checks": {name: "ok" or what is wrong}}``.
        Meant for a readiness probe (take the process out of the load balancer),
        not a liveness one: a Redis outage makes every process unready at once,
        and restarting them would not bring Redis back.
        """

        async def health(request: Request) -> Response:
            found = self.health()
            return JSONResponse(
                {"ready": found.ready, "checks": found.checks},
                status_code=200 if found.ready else 503,
                headers={"cache-control": "no-store"},
            )

        return Route(path, health, methods=["GET", "HEAD"], name=name)

    def collector(self) -> ReplayCollector:
        """A prometheus-client collector of this Replay's figures, read at every scrape.

        For an app that serves its own metrics: ``REGISTRY.register(replay.collector())``.
        Raises ``ImportError`` without prometheus-client (the ``metrics`` extra).
        """
        return ReplayCollector(
            metrics=self.metrics,
            stats=self.stats,
            frames_sent_open=lambda: self._registry.frames_sent,
            ready=lambda: self.health().ready,
            store=self.store,
            on_loop=self._on_loop,
        )

    def _on_loop(self, read: Callable[[], T]) -> T:
        """``read()`` on the event loop's thread while the Replay runs (from another thread, it waits for it)."""
        token, thread = self._loop.token, self._loop.thread
        if token is None or threading.get_ident() == thread:
            return read()
        return anyio.from_thread.run_sync(read, token=token)

    def metrics_route(self, path: str = "/metrics", *, name: str | None = None) -> Route:
        """A route serving this Replay's metrics in the Prometheus text format (or OpenMetrics when asked).

        The figures are this process's (see docs/operations.md for several
        workers). Raises ``ImportError`` without prometheus-client (the
        ``metrics`` extra), when called.
        """
        collector = self.collector()  # first: without prometheus-client, its ImportError names the extra
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)

        async def metrics(request: Request) -> Response:
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encode(registry), media_type=content_type, headers={"cache-control": "no-store"})

        return Route(path, metrics, methods=["GET"], name=name)

    # --- publishing ----------------------------------------------------------------

    def publisher(self) -> Publisher:
        """The :class:`Publisher` of this Replay; a FastAPI dependency: ``Depends(replay.publisher)``."""
        return self._publisher

    async def publish(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event:
        """See :meth:`Publisher.publish`."""
        return await self._publisher.publish(topic, event_type, data, idempotency_key=idempotency_key)

    async def publish_many(
        self,
        topic: str,
        events: Iterable[tuple[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[Event]:
        """See :meth:`Publisher.publish_many`."""
        return await self._publisher.publish_many(topic, events, idempotency_key=idempotency_key)

    def publish_sync(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event:
        """See :meth:`Publisher.publish_sync`."""
        return self._publisher.publish_sync(topic, event_type, data, idempotency_key=idempotency_key)

    async def history(self, topic: str, after: int | None = None, limit: int = 100) -> list[Event]:
        """Up to ``limit`` retained events of ``topic`` with offset > ``after``, oldest first.

        ``after=None`` starts at the oldest retained event. Page on with
        ``after=events[-1].offset``. Raises ``InvalidTopic``, ``ValueError`` for
        a bad ``after``/``limit``, ``StoreUnavailable``. Safe to cancel.
        """
        check_topic(topic)
        check_int("limit", limit, high=10_000)
        if after is not None:
            check_int("after", after, low=0)
        self._check_running()
        return await self.store.read(topic, 0 if after is None else after, limit)

    async def position(self, topic: str) -> Position:
        """The topic's epoch, head and oldest retained offset.

        With :meth:`history` this gives an app a consistent snapshot: read the
        events up to ``head``, show them, and have the client subscribe from
        ``(epoch, head)`` so that nothing between the snapshot and live is missed.
        Raises ``InvalidTopic``, ``NotRunning``, ``StoreUnavailable``. Safe to cancel.
        """
        check_topic(topic)
        self._check_running()
        return await self.store.position(topic)

    async def revoke(self, identity: str, *, reason: str = "identity revoked") -> int:
        """Close every connection of ``identity`` in this process with 1008 (policy violation).

        For a signed-out user, a deleted account, a leaked token: first make the
        app's ``identify`` hook refuse the credentials (else the client's next
        handshake is accepted again), then call ``revoke``. Per the protocol a
        client stops on 1008 and does not reconnect by itself. Handshakes of that
        identity still in progress (accepted after this call started) are closed
        too. Only this process's connections: with several workers, call it in
        each (e.g. from a message your app broadcasts).

        Returns the number of connections closed, once they are closed (waiting
        at most ``close_timeout`` + 1 s for their close handshakes). Never raises.
        Cancelling is safe: the connections are already being closed; only the
        wait stops.
        """
        return await self._registry.revoke(identity, reason)

    async def recheck(
        self,
        check: Callable[[HTTPConnection, str | None], bool | Awaitable[bool]],
        *,
        reason: str = "identity no longer valid",
    ) -> int:
        """Re-check every connection of this process; close those that fail with 1008.

        ``check(conn, identity)`` gets each connection's handshake
        ``WebSocket`` (its headers, cookies, subprotocols, ``state``), or an SSE
        stream's ``Request``, and the
        identity ``identify`` returned; return False (or raise) to close it. Call
        it periodically from the app (e.g. a task in its lifespan) to expire
        tokens or sessions that were valid at the handshake. Connections are
        checked one after the other; a check that raises is logged and counts
        as False.

        Returns the number of connections closed, once they are closed (at most
        ``close_timeout`` + 1 s of waiting). Cancelling is safe: connections
        already found invalid are being closed; the others stay open.
        """
        return await self._registry.recheck(check, reason)

    async def snapshot(self, topic: str, *, limit: int = 1000) -> Snapshot:
        """The newest retained events of ``topic`` (at most ``limit``) and the cursor right after them.

        For an app that renders state over HTTP first: show ``snapshot.events``,
        then have the client subscribe from ``snapshot.cursor``; nothing published
        in between is missed or shown twice. The events are contiguous and end at
        the head; if the history is trimmed or reset while it is read, the read
        starts over (a few times). ``snapshot.complete`` is False when more than
        ``limit`` events were retained (only the newest are returned).

        Raises ``InvalidTopic``, ``ValueError`` (bad ``limit``), ``NotRunning``,
        ``StoreUnavailable``, and ``ReplayError`` when the history changed under
        every attempt (a topic trimmed faster than it can be read). Safe to cancel.
        """
        check_topic(topic)
        check_int("limit", limit, high=100_000)
        self._check_running()
        for _ in range(_SNAPSHOT_ATTEMPTS):
            position = await self.store.position(topic)
            start = max(position.oldest - 1, position.head - limit)
            events: list[Event] = []
            after = start
            while after < position.head:
                page = await self.store.read(topic, after, min(500, position.head - after))
                if not page or page[0].offset != after + 1 or page[-1].epoch != position.epoch:
                    break  # trimmed or reset meanwhile: start over
                events += page
                after = page[-1].offset
            else:
                return Snapshot(topic, position.epoch, position.head, events, complete=start == position.oldest - 1)
        raise ReplayError(f"the history of {topic!r} changed under every attempt to read it")

    def health(self) -> Health:
        """Whether this process can serve now: ready only while the Replay runs and its store answers.

        A RedisStore is ready while its commands are answered and its listener
        receives the probe it publishes to itself (every ``health_check_interval
        / 5`` s) through its own pub/sub path: a listener that got none for
        ``health_check_interval`` s is stalled. A MemoryStore is always ready;
        a store without a ``health()`` of its own is taken as ready. Reads what
        the checks found, without I/O: never blocks, never raises.
        """
        if not self.running:
            return Health(False, {"replay": "not running"})
        store = self.store
        found = store.health() if isinstance(store, HealthCheck) else Health(True, {"store": "no health check"})
        return Health(found.ready, {"replay": "running", **found.checks})

    def stats(self) -> dict[str, int]:
        """Counts for metrics and leak checks: connections (SSE streams among them), subscriptions,
        topics, queued frames."""
        return {
            "connections": len(self._registry.connections),
            "sse_streams": self._registry.sse_streams,
            "subscriptions": self.hub.subscription_count,
            "topics": self.hub.topic_count,
            "queued_frames": self._registry.queued_frames,
        }
