"""An ``EventStore`` for the MCP SDK's Streamable HTTP transport, backed by a Replay's store.

The MCP Python SDK (``pip install "starlette-replay[mcp]"``) makes a server's
SSE streams resumable through an ``EventStore``: every message is stored
before it is sent, and a client that reconnects with ``Last-Event-ID`` gets
what it missed. The SDK ships an in-memory example only. :class:`ReplayEventStore`
keeps the messages in a :class:`~starlette_replay.Replay`'s store instead, so
with a ``RedisStore`` they survive the process, and a resume can be served by
another server process than the one running the request::

    replay = Replay(RedisStore.from_url("redis://localhost:6379/0"))
    event_store = ReplayEventStore(replay)
    server = MCPServer("demo")
    mcp_app = server.streamable_http_app(event_store=event_store, retry_interval=1000)
    app = event_store.wrap(mcp_app)   # the ASGI app to serve; run `replay` in its lifespan

Each MCP stream (one per request, and the session's standalone GET stream) is
one topic, ``<prefix>:<session>:<stream>``; its events are the stream's
messages in order (and the SDK's "priming" markers, never sent). An event id
is that topic with the event's epoch, offset and time, so any process can
resume it from the store alone.

Why ``wrap``: the SDK's ``EventStore`` interface names a stream by its request
id only, which repeats across sessions (every session's first request is id
0 or 1), and its resume runs only in the process that holds the session. The
wrapper gives each request's calls the session they belong to (through a
context variable), and answers a resume itself (a ``GET`` with a
``Last-Event-ID`` of this store) in whichever process gets it: it sends the
stored messages after that id, then the ones still being stored (by this or
another process) until the request's response, or, on the standalone stream,
until the client goes. The SDK's own resume leaves a window between its replay
and live delivery where messages are stored but not sent; this one has none.

Every request makes a topic: give the store a ``history_ttl`` (e.g.
``RedisStore.from_url(url, history_ttl=3600)``) so that finished streams
leave it (a MemoryStore also forgets the least recently used past its
``max_topics``).

What it cannot promise: when the store lost the stream's history (a new
epoch, trimmed past the cursor, a reused offset: see the wire protocol's
"Reused offsets"), MCP has no way to tell the client, so the resume sends
what the store still holds and logs a warning. Live messages of a resumed
stream are read by polling the store (``poll_interval`` to
``max_poll_interval`` seconds): the public Replay API has no in-process live
subscription yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .events import Event
from .protocol import check_topic
from .replay import Replay

try:
    from mcp.server.streamable_http import GET_STREAM_KEY, EventCallback, EventId, EventMessage, EventStore, StreamId
    from mcp.types import JSONRPCMessage, jsonrpc_message_adapter
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('starlette_replay.mcp needs the MCP SDK: pip install "starlette-replay[mcp]"') from exc

__all__ = ["ReplayEventStore"]

logger = logging.getLogger("starlette_replay.mcp")

_SESSION_HEADER = "mcp-session-id"
_MESSAGE = "mcp_message"
_PRIMING = "mcp_priming"
_PAGE = 500
_KEEPALIVE = 15.0  # seconds of silence on a resumed stream before a comment line
_PLAIN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_INIT = "init."  # the namespace of a session's opening request, made before the session has an id


def _key(value: str) -> str:
    """``value`` as one topic segment: itself when it is short and plain, else a digest of it."""
    if _PLAIN.fullmatch(value) and not value.startswith(("h.", _INIT)):
        return value
    return "h." + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _ends_stream(event: Event) -> bool:
    """Whether ``event`` is a request's response: the last message of that request's stream."""
    if event.event != _MESSAGE or event.data["stream"] == GET_STREAM_KEY:
        return False
    message = event.data["message"]
    return "id" in message and ("result" in message or "error" in message)


@dataclass
class _Scope:
    """The session of the request being served, as the store's calls see it (a context variable).

    The session's own task (the SDK's message router) is started while its
    opening request is served, so it shares that request's scope: ``namespace``
    is a random ``init.`` name until the response names the session, and the
    session id after. Streams named before that keep their topic (``fixed``).
    """

    namespace: str
    fixed: dict[str, str] = field(default_factory=dict)


_scope: ContextVar[_Scope | None] = ContextVar("starlette_replay_mcp_scope", default=None)


@dataclass(frozen=True, slots=True)
class _Cursor:
    topic: str
    epoch: str
    offset: int
    time: int


class ReplayEventStore(EventStore):
    """An MCP ``EventStore`` whose events live in ``replay``'s store (memory or Redis).

    ``prefix`` starts every topic (a topic of its own per MCP stream). Serve
    the app through :meth:`wrap`, and run the Replay in the app's lifespan
    (``async with replay:``). Calling :meth:`store_event` outside an app made
    by :meth:`wrap` raises ``RuntimeError``: without the session, streams of
    different sessions would share a topic.
    """

    def __init__(
        self,
        replay: Replay,
        *,
        prefix: str = "mcp",
        poll_interval: float = 0.05,
        max_poll_interval: float = 1.0,
    ) -> None:
        check_topic(prefix)
        if len(prefix) > 64:  # with a session and a stream segment, a topic stays within 256 characters
            raise ValueError(f"prefix must be at most 64 characters, not {len(prefix)}")
        if not 0 < poll_interval <= max_poll_interval:
            raise ValueError("need 0 < poll_interval <= max_poll_interval (seconds)")
        self.replay = replay
        self.prefix = prefix
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval

    def __repr__(self) -> str:
        return f"ReplayEventStore(prefix={self.prefix!r}, replay={self.replay!r})"

    # --- the EventStore interface --------------------------------------------------

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        """Store one message of ``stream_id`` (None: the SDK's priming marker) and return its event id.

        Raises ``RuntimeError`` outside :meth:`wrap`, and what ``replay.publish``
        raises (``StoreUnavailable``...). Cancelling it is as safe as a publish.
        """
        topic = self._topic(stream_id)
        if message is None:
            event = await self.replay.publish(topic, _PRIMING, {"stream": stream_id})
        else:
            data = {"stream": stream_id, "message": message.model_dump(mode="json", by_alias=True, exclude_unset=True)}
            event = await self.replay.publish(topic, _MESSAGE, data)
        return self._event_id(event)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Send the stream's messages after ``last_event_id``, then follow it until its response.

        The SDK calls this for a resume that :meth:`wrap` did not take (an id
        that is not this store's: then nothing is sent). Returns None, so the
        SDK ends the response once this returns: everything of the stream has
        been sent by then. Cancelling it (the client went) is safe.
        """
        cursor = self._parse(last_event_id)
        if cursor is None:
            return None
        current = _scope.get()
        if current is None or not self._owns(cursor, current.namespace):
            logger.warning("resume of %s refused: not this session's stream", cursor.topic)
            return None

        async def deliver(event_id: str, message: dict[str, Any]) -> None:
            await send_callback(EventMessage(jsonrpc_message_adapter.validate_python(message), event_id))

        await self._follow(cursor, deliver, None)
        return None

    # --- the ASGI wrapper ----------------------------------------------------------

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The ASGI app to serve in place of ``app`` (the SDK's Streamable HTTP app, or one mounting it).

        It tells this store which session each request belongs to, and answers
        a ``GET`` with an ``Mcp-Session-Id`` and a ``Last-Event-ID`` that is one
        of this store's ids itself, from the store (see the module docstring);
        a session that does not own the stream gets 404. Other requests go to
        ``app`` unchanged.
        """

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            headers = Headers(scope=scope)
            session = headers.get(_SESSION_HEADER)
            last_event_id = headers.get("last-event-id")
            if scope["method"] == "GET" and last_event_id is not None and session is not None:
                # an MCP resume (other SSE routes of the app, without the session header, pass on)
                cursor = self._parse(last_event_id)
                if cursor is not None:
                    await self._serve_resume(cursor, session, receive, send)
                    return
            if session is not None:
                token = _scope.set(_Scope(_key(session)))
                try:
                    await app(scope, receive, send)
                finally:
                    _scope.reset(token)
                return
            opening = _Scope(_INIT + secrets.token_hex(16))

            async def learn_session(message: Message) -> None:
                if message["type"] == "http.response.start":
                    for name, value in message.get("headers", []):
                        if name.lower() == b"mcp-session-id":
                            opening.namespace = _key(value.decode("latin-1"))
                await send(message)

            token = _scope.set(opening)
            try:
                await app(scope, receive, learn_session)
            finally:
                _scope.reset(token)

        return wrapped

    # --- inside ----------------------------------------------------------------------

    def _topic(self, stream_id: str) -> str:
        current = _scope.get()
        if current is None:
            raise RuntimeError(
                "ReplayEventStore.store_event outside its app: serve the MCP app through event_store.wrap(app)"
            )
        topic = current.fixed.get(stream_id)
        if topic is None:
            topic = f"{self.prefix}:{current.namespace}:{_key(stream_id)}"
            if current.namespace.startswith(_INIT):
                current.fixed[stream_id] = topic
        return topic

    @staticmethod
    def _event_id(event: Event) -> str:
        return f"{event.topic}:{event.epoch}:{event.offset}:{event.time}"

    def _parse(self, event_id: str) -> _Cursor | None:
        parts = event_id.strip().rsplit(":", 3)
        if len(parts) != 4 or not parts[0].startswith(self.prefix + ":"):
            return None
        topic, epoch, offset, time = parts
        if not epoch or not offset.isdigit() or not time.isdigit() or len(offset) > 16 or len(time) > 16:
            return None
        try:
            check_topic(topic)
        except ValueError:
            return None
        return _Cursor(topic, epoch, int(offset), int(time))

    def _allowed(self, cursor: _Cursor, session: str | None) -> bool:
        """A resume needs the session's header; its id must name that session's stream.

        A session's opening stream has a random name (``init.``...) of its own,
        made before the session had an id: knowing it is what allows it.
        """
        return session is not None and self._owns(cursor, _key(session))

    def _owns(self, cursor: _Cursor, namespace: str) -> bool:
        stream_namespace = cursor.topic[len(self.prefix) + 1 :].split(":", 1)[0]
        return stream_namespace == namespace or stream_namespace.startswith(_INIT)

    async def _start_after(self, cursor: _Cursor) -> int | None:
        """The offset to send from: the cursor's, or where the retained history starts when it is gone.

        None when the cursor is the request's response: its stream is complete.
        """
        events = await self.replay.history(cursor.topic, after=max(0, cursor.offset - 1), limit=1)
        if events and events[0].epoch == cursor.epoch and events[0].offset == cursor.offset:
            at = events[0]
            if at.time == cursor.time:
                if _ends_stream(at):
                    return None
                return cursor.offset
            why = "the offset was reused for another event (the store lost events)"
        else:
            position = await self.replay.position(cursor.topic)
            if position.epoch == cursor.epoch and position.oldest - 1 <= cursor.offset <= position.head:
                return cursor.offset  # the cursor's own event is trimmed, the ones after it are not
            why = "the store no longer holds the history after it"
            if position.epoch == cursor.epoch and cursor.offset > position.head:
                logger.warning("resume of %s at %d: %s; sending what follows", cursor.topic, cursor.offset, why)
                return position.head
        logger.warning("resume of %s at %d: %s; sending all it still holds", cursor.topic, cursor.offset, why)
        position = await self.replay.position(cursor.topic)
        return position.oldest - 1

    async def _follow(
        self,
        cursor: _Cursor,
        deliver: Callable[[str, dict[str, Any]], Awaitable[None]],
        idle: Callable[[], Awaitable[None]] | None,
    ) -> None:
        """Send the stream's stored messages after ``cursor``, then the ones stored later, in order.

        Ends after a request stream's response; the standalone stream goes on
        until cancelled. ``idle`` is called after ``_KEEPALIVE`` seconds without
        a message.
        """
        start = await self._start_after(cursor)
        if start is None:
            return
        after = start
        wait = self.poll_interval
        quiet_since = anyio.current_time()
        while True:
            events = await self.replay.history(cursor.topic, after=after, limit=_PAGE)
            for event in events:
                after = event.offset
                if event.event != _MESSAGE:
                    continue
                message = event.data["message"]
                await deliver(self._event_id(event), message)
                if _ends_stream(event):
                    return  # the request's response: its stream is complete
            if len(events) == _PAGE:
                continue
            if events:
                wait = self.poll_interval
                quiet_since = anyio.current_time()
            elif idle is not None and anyio.current_time() - quiet_since >= _KEEPALIVE:
                await idle()
                quiet_since = anyio.current_time()
            await anyio.sleep(wait)
            wait = min(wait * 2, self.max_poll_interval)

    async def _serve_resume(self, cursor: _Cursor, session: str | None, receive: Receive, send: Send) -> None:
        """Answer a resume ``GET`` from the store: an SSE response, as the SDK's would be."""
        if not self._allowed(cursor, session):
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}})
            await send(
                {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        assert session is not None
        logger.info("resuming %s after offset %d (epoch %s)", cursor.topic, cursor.offset, cursor.epoch)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache, no-transform"),
                    (b"x-accel-buffering", b"no"),
                    (b"mcp-session-id", session.encode("latin-1")),
                ],
            }
        )

        async def deliver(event_id: str, message: dict[str, Any]) -> None:
            data = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
            frame = f"id: {event_id}\nevent: message\ndata: {data}\n\n"
            await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})

        async def ping() -> None:
            await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})

        async with anyio.create_task_group() as tg:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnect)
            try:
                await self._follow(cursor, deliver, ping)
            except OSError:
                pass  # the client went while we wrote: it resumes again from its last id
            tg.cancel_scope.cancel()
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass
