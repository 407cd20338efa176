"""The app that end-to-end tests run in uvicorn: ``uvicorn --factory tests.e2e.apps:make_app``.

Configured by environment variables (all optional):

``REPLAY_STORE``
    ``memory`` (default) or ``redis``.
``REPLAY_REDIS_URL`` (or ``REDIS_URL``), ``REPLAY_REDIS_PREFIX``, ``REPLAY_PUBLISH_TIMEOUT``
    For ``redis``: ``RedisStore.from_url(url, prefix=..., publish_timeout=...)``.
``REPLAY_HISTORY_SIZE``, ``REPLAY_HISTORY_TTL``
    The store's ``history_size`` / ``history_ttl``.
``REPLAY_READ_DELAY``, ``REPLAY_POSITION_DELAY``
    Seconds to sleep in every ``store.read()`` / ``store.position()`` call (wraps
    the store): widen the replay -> live hand-off on purpose.
``REPLAY_SEND_QUEUE_SIZE``, ``REPLAY_MAX_MESSAGE_SIZE``, ``REPLAY_HEARTBEAT``,
``REPLAY_PAGE_SIZE``, ``REPLAY_MAX_FRAME_RATE``, ``REPLAY_FRAME_BURST``, ``REPLAY_CLOSE_TIMEOUT``,
``REPLAY_MAX_BAD_FRAMES``, ``REPLAY_BAD_FRAMES_WINDOW``, ``REPLAY_MAX_SUBSCRIPTIONS``, ``REPLAY_SSE_RETRY``
    The matching ``Replay`` options.
``REPLAY_ALLOWED_ORIGINS``
    Comma-separated; unset means same-origin only.
``REPLAY_FORBIDDEN_PREFIX``
    Topics starting with it are refused by ``authorize`` (default ``forbidden``).
``REPLAY_PARENT_PID``
    Set by ``tests/servers.py``: the server shuts itself down when that process is gone.
``REPLAY_LOG_LEVEL``
    Level of the ``starlette_replay`` loggers, written to stderr (default ``INFO``).

The identity (for stored cursors) is the ``identity`` query parameter, if any;
``identity=refuse`` refuses the handshake.

HTTP routes:

``GET /health``
    ``{"pid": ..., "store": ...}`` once the lifespan has started.
``POST /publish`` ``{"topic", "count"=1, "size"=0, "event"="tick", "batch"=false, "tag"=null}``
    Publishes ``count`` events one after the other (``batch``: one
    ``publish_many``), data ``{"i": k, "tag": tag, "pad": "x" * size}``;
    answers ``{"topic", "epoch", "first", "last"}``.
``POST /pump`` ``{"topics", "count", "interval"=0.0, "size"=0, "event"="tick"}``
    Starts a background task publishing ``count`` events to each topic (round
    robin, sleeping ``interval`` s between rounds); answers ``{"id"}``.
``POST /pump/{id}/wait``
    Waits for that pump to finish; answers ``{topic: {"epoch", "last"}}``.
``GET /sse?topic=...``
    The SSE route (``replay.sse_route``); the FastAPI app mounts it with ``app.add_route``.
``GET /position?topic=``, ``GET /history?topic=&after=&limit=``, ``GET /stats``
    The store's position, ``replay.history`` (offsets and data), ``replay.stats()``.
``POST /revoke?identity=``
    ``replay.revoke(identity)``: a server-side drop of that identity's connections and streams
    (this app's ``identify`` accepts the identity again on the reconnect).
``GET /replay.js``
    The browser client (``replay.client_route``).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_replay import Cursor, Event, EventStore, MemoryStore, Position, RedisStore, Refused, Replay
from starlette_replay.stores.base import LiveSink

__all__ = ["SlowReadStore", "make_app", "make_fastapi_app", "make_store"]

logger = logging.getLogger("tests.e2e.apps")


class SlowReadStore:
    """Wraps a store; every ``read()`` first sleeps ``delay`` seconds, every ``position()`` ``position_delay``.

    A slow ``position()`` lets live events reach a new subscription between its
    registration and the head it reads: events the replay will also send, which
    the hand-off must drop.
    """

    def __init__(self, inner: EventStore, delay: float, position_delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.position_delay = position_delay
        self.reads = 0

    def __repr__(self) -> str:
        return f"SlowReadStore({self.inner!r}, delay={self.delay}, position_delay={self.position_delay})"

    def connect(self, sink: LiveSink) -> AbstractAsyncContextManager[None]:
        return self.inner.connect(sink)

    async def subscribe(self, topic: str) -> None:
        await self.inner.subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        await self.inner.unsubscribe(topic)

    async def append(
        self, topic: str, items: Sequence[tuple[str, str]], *, idempotency_key: str | None = None
    ) -> list[Event]:
        return await self.inner.append(topic, items, idempotency_key=idempotency_key)

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        self.reads += 1
        await anyio.sleep(self.delay)
        return await self.inner.read(topic, after, limit)

    async def position(self, topic: str) -> Position:
        if self.position_delay:
            await anyio.sleep(self.position_delay)
        return await self.inner.position(topic)

    async def load_cursor(self, identity: str, topic: str) -> Cursor | None:
        return await self.inner.load_cursor(identity, topic)

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        await self.inner.save_cursor(identity, topic, cursor)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def make_store() -> EventStore:
    """The store named by ``REPLAY_STORE``, wrapped by ``REPLAY_READ_DELAY`` if set."""
    kind = os.environ.get("REPLAY_STORE", "memory")
    options: dict[str, Any] = {}
    if (history_size := _env_int("REPLAY_HISTORY_SIZE")) is not None:
        options["history_size"] = history_size
    if (history_ttl := _env_float("REPLAY_HISTORY_TTL")) is not None:
        options["history_ttl"] = history_ttl
    store: EventStore
    if kind == "memory":
        store = MemoryStore(**options)
    elif kind == "redis":
        url = os.environ.get("REPLAY_REDIS_URL") or os.environ.get("REDIS_URL")
        if not url:
            raise RuntimeError("REPLAY_STORE=redis needs REPLAY_REDIS_URL")
        if prefix := os.environ.get("REPLAY_REDIS_PREFIX"):
            options["prefix"] = prefix
        if (publish_timeout := _env_float("REPLAY_PUBLISH_TIMEOUT")) is not None:
            options["publish_timeout"] = publish_timeout
        redis_store: Any = RedisStore.from_url(url, **options)  # Any: a placeholder class until it lands
        store = redis_store
    else:
        raise RuntimeError(f"unknown REPLAY_STORE {kind!r}")
    delay = _env_float("REPLAY_READ_DELAY") or 0.0
    position_delay = _env_float("REPLAY_POSITION_DELAY") or 0.0
    if delay or position_delay:
        store = SlowReadStore(store, delay, position_delay)
    return store


def _replay_options() -> dict[str, Any]:
    options: dict[str, Any] = {}
    for env, name in (
        ("REPLAY_SEND_QUEUE_SIZE", "send_queue_size"),
        ("REPLAY_MAX_MESSAGE_SIZE", "max_message_size"),
        ("REPLAY_PAGE_SIZE", "replay_page_size"),
        ("REPLAY_FRAME_BURST", "frame_burst"),
        ("REPLAY_MAX_BAD_FRAMES", "max_bad_frames"),
        ("REPLAY_MAX_SUBSCRIPTIONS", "max_subscriptions"),
        ("REPLAY_SSE_RETRY", "sse_retry"),
    ):
        if (number := _env_int(env)) is not None:
            options[name] = number
    for env, name in (
        ("REPLAY_HEARTBEAT", "heartbeat_interval"),
        ("REPLAY_MAX_FRAME_RATE", "max_frame_rate"),
        ("REPLAY_CLOSE_TIMEOUT", "close_timeout"),
        ("REPLAY_BAD_FRAMES_WINDOW", "bad_frames_window"),
    ):
        if (seconds := _env_float(env)) is not None:
            options[name] = seconds
    if origins := os.environ.get("REPLAY_ALLOWED_ORIGINS"):
        options["allowed_origins"] = [o.strip() for o in origins.split(",") if o.strip()]
    return options


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    for name in ("starlette_replay", "tests"):
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.setLevel(os.environ.get("REPLAY_LOG_LEVEL", "INFO"))
        named.propagate = False


async def _exit_with_parent() -> None:
    """SIGTERM this server once the test run that started it is gone (``REPLAY_PARENT_PID``).

    A test run killed hard leaves no server listening behind it. The parent's
    death has no event to wait on: this checks twice a second. Under servers
    that run the app in a worker process (hypercorn, granian) the test run is
    not this process's parent: the check is whether it still exists, and the
    server's main process is stopped too.
    """
    parent = _env_int("REPLAY_PARENT_PID")
    if parent is None:
        return
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            logger.warning("the test run (pid %d) is gone: shutting down", parent)
            main = os.getppid()
            if main not in (1, parent):
                os.kill(main, signal.SIGTERM)  # the server's main process
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except PermissionError:
            pass  # it exists
        await anyio.sleep(0.5)


def make_app() -> Starlette:
    """Build the test app from the environment (see the module docstring)."""
    _configure_logging()
    forbidden_prefix = os.environ.get("REPLAY_FORBIDDEN_PREFIX", "forbidden")

    def authorize(conn: HTTPConnection, topic: str) -> bool:
        return not topic.startswith(forbidden_prefix)

    def identify(conn: HTTPConnection) -> str | None:
        identity = conn.query_params.get("identity")
        if identity == "refuse":
            raise Refused("refused by the test app")
        return identity

    store = make_store()
    replay = Replay(store, authorize=authorize, identify=identify, **_replay_options())
    pumps: dict[int, anyio.Event] = {}
    pump_results: dict[int, dict[str, Any]] = {}
    pump_ids = itertools.count(1)
    task_group: TaskGroup | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal task_group
        async with replay, anyio.create_task_group() as tg:
            task_group = tg
            tg.start_soon(_exit_with_parent)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                task_group = None

    def event_data(i: int, tag: Any, size: int) -> dict[str, Any]:
        return {"i": i, "tag": tag, "pad": "x" * size}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid(), "store": repr(store)})

    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        topic = body["topic"]
        count = int(body.get("count", 1))
        size = int(body.get("size", 0))
        event_type = body.get("event", "tick")
        tag = body.get("tag")
        if body.get("batch"):
            events = await replay.publish_many(topic, [(event_type, event_data(i, tag, size)) for i in range(count)])
        else:
            events = [await replay.publish(topic, event_type, event_data(i, tag, size)) for i in range(count)]
        return JSONResponse(
            {"topic": topic, "epoch": events[-1].epoch, "first": events[0].offset, "last": events[-1].offset}
        )

    async def run_pump(pump_id: int, topics: list[str], count: int, interval: float, size: int, event: str) -> None:
        result: dict[str, Any] = {}
        try:
            for i in range(count):
                for topic in topics:
                    stored = await replay.publish(topic, event, event_data(i, pump_id, size))
                    result[topic] = {"epoch": stored.epoch, "last": stored.offset}
                if interval:
                    await anyio.sleep(interval)
                else:
                    await anyio.lowlevel.checkpoint()
        except Exception as exc:
            logger.exception("pump %d failed", pump_id)
            result["error"] = repr(exc)
        finally:
            pump_results[pump_id] = result
            pumps[pump_id].set()

    async def pump(request: Request) -> JSONResponse:
        body = await request.json()
        if task_group is None:
            return JSONResponse({"error": "not running"}, status_code=503)
        pump_id = next(pump_ids)
        pumps[pump_id] = anyio.Event()
        task_group.start_soon(
            run_pump,
            pump_id,
            list(body["topics"]),
            int(body["count"]),
            float(body.get("interval", 0.0)),
            int(body.get("size", 0)),
            body.get("event", "tick"),
        )
        return JSONResponse({"id": pump_id})

    async def pump_wait(request: Request) -> JSONResponse:
        pump_id = int(request.path_params["pump_id"])
        done = pumps.get(pump_id)
        if done is None:
            return JSONResponse({"error": "no such pump"}, status_code=404)
        await done.wait()
        return JSONResponse(pump_results.pop(pump_id))

    async def position(request: Request) -> JSONResponse:
        pos = await store.position(request.query_params["topic"])
        return JSONResponse({"epoch": pos.epoch, "head": pos.head, "oldest": pos.oldest})

    async def history(request: Request) -> JSONResponse:
        params = request.query_params
        after = params.get("after")
        events = await replay.history(
            params["topic"], after=int(after) if after else None, limit=int(params.get("limit", "100"))
        )
        return JSONResponse([{"epoch": e.epoch, "offset": e.offset, "event": e.event, "data": e.data} for e in events])

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(replay.stats())

    async def revoke(request: Request) -> JSONResponse:
        return JSONResponse({"closed": await replay.revoke(request.query_params["identity"])})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/publish", publish, methods=["POST"]),
            Route("/pump", pump, methods=["POST"]),
            Route("/pump/{pump_id:int}/wait", pump_wait, methods=["POST"]),
            Route("/position", position),
            Route("/history", history),
            Route("/stats", stats),
            Route("/revoke", revoke, methods=["POST"]),
            replay.route("/ws"),
            replay.sse_route("/sse"),
            replay.client_route("/replay.js"),
        ],
        lifespan=lifespan,
    )


def make_fastapi_app() -> Any:
    """A FastAPI app on the same environment: the route via ``add_api_websocket_route``, publishing
    through ``Depends(replay.publisher)`` from an ``async def`` handler and with ``publish_sync`` from a
    ``def`` handler (FastAPI runs it in a worker thread).

    Routes: ``GET /health``, ``POST /fastapi/publish?topic=&tag=`` (async),
    ``POST /fastapi/publish-sync?topic=&tag=`` (sync); each answers ``{"epoch", "offset"}``.
    """
    from fastapi import Depends, FastAPI

    from starlette_replay import Publisher, allow_all

    _configure_logging()
    replay = Replay(make_store(), authorize=allow_all, **_replay_options())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # An app with a lifespan of its own nests the Replay's.
        async with replay.lifespan(app), anyio.create_task_group() as tg:
            tg.start_soon(_exit_with_parent)
            yield
            tg.cancel_scope.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"pid": os.getpid(), "store": repr(replay.store)}

    @app.post("/fastapi/publish")
    async def publish(topic: str, tag: str, publisher: Publisher = Depends(replay.publisher)) -> dict[str, Any]:  # noqa: B008
        event = await publisher.publish(topic, "note", {"tag": tag, "via": "async"})
        return {"epoch": event.epoch, "offset": event.offset}

    @app.post("/fastapi/publish-sync")
    def publish_sync(topic: str, tag: str, publisher: Publisher = Depends(replay.publisher)) -> dict[str, Any]:  # noqa: B008
        event = publisher.publish_sync(topic, "note", {"tag": tag, "via": "sync"})
        return {"epoch": event.epoch, "offset": event.offset}

    app.add_api_websocket_route("/ws", replay.endpoint)
    app.add_route("/sse", replay.sse_endpoint)
    return app
