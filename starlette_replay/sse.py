"""The SSE route: the same topics, positions and promises as the WebSocket route, as ``text/event-stream``.

A stream is a :class:`~starlette_replay.connection.Connection` with another
carrier: the same hub, store, limits, hooks and registry, the same send queue
and writer (so the body is paced by the socket and a stuck client only fills
its own queue), the same replay -> live hand-off (``Connection._join`` for
every topic before the response starts, then ``Connection._start`` for each in
request order). What differs is the framing (every message is an ``id:`` line
holding the cursor list after it, and one ``data:`` line holding the JSON frame
the WebSocket route would send), the end (the response body ends instead of a
close frame) and the absence of client frames (the request carries the
subscriptions; the only thing read is the client leaving).

The contract is ``docs/protocol.md`` ("Server-sent events"); ``docs/sse.md``
shows how to use it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .connection import AsgiSend, Authorize, Connection, Limits
from .endpoint import Endpoint, Refusal, origin_allowed
from .events import Event
from .hub import Hub, Subscription
from .protocol import (
    SSE_PING,
    CloseCode,
    ErrorCode,
    FrameError,
    StreamRequest,
    Subscribe,
    cursor_list_fits,
    encode_cursor_entry,
    encode_error,
    encode_event,
    encode_sse_message,
    encode_sse_retry,
    parse_stream_request,
)
from .registry import Registry
from .stores.base import Cursor, EventStore, Position

__all__ = ["SSE_HEADERS", "EventStream", "EventStreamResponse", "SSEEndpoint"]

logger = logging.getLogger("starlette_replay.sse")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied responses unless told not to; a buffered stream is no stream.
    (b"x-accel-buffering", b"no"),
]


class EventStream(Connection):
    """One SSE response: a :class:`Connection` writing SSE messages to a response body.

    Made by :class:`SSEEndpoint` with the request's parsed subscriptions; the
    hub and the Replay's registry see it as any other connection (stats,
    heartbeat, revoke, shutdown).
    """

    __slots__ = ("_entries", "_index", "_joined", "_receive", "_subscribes")

    ping_frame = SSE_PING
    transport = "sse"

    def __init__(
        self,
        request: Request,
        send: AsgiSend,
        receive: Receive,
        identity: str | None,
        conn_id: str,
        subscribes: list[Subscribe],
        *,
        hub: Hub,
        store: EventStore,
        limits: Limits,
        authorize: Authorize | None,
    ) -> None:
        super().__init__(
            request, identity, conn_id, hub=hub, store=store, limits=limits, authorize=authorize, send=send
        )
        self._receive = receive
        self._subscribes = subscribes
        self._index = {sub.topic: i for i, sub in enumerate(subscribes)}
        # The cursor list after the last message queued: a topic keeps the entry the
        # client sent until its `subscribed` is queued.
        self._entries = [
            "" if sub.epoch is None or sub.offset is None else encode_cursor_entry(sub.epoch, sub.offset, sub.time)
            for sub in subscribes
        ]
        self._joined: list[tuple[Subscribe, Subscription, Cursor | None, Position]] = []

    def __repr__(self) -> str:
        return f"EventStream({self.id}, identity={self.identity!r}, topics={len(self.subs)})"

    # --- framing: every frame is queued as its SSE message ----------------------------

    def _message(self, topic: str, entry: str, frame: str) -> str:
        entries = self._entries
        entries[self._index[topic]] = entry
        return encode_sse_message(frame, ",".join(entries))

    def push_live(self, frame: str, event: Event) -> None:
        Connection.push_live(
            self, self._message(event.topic, encode_cursor_entry(event.epoch, event.offset, event.time), frame), event
        )

    def _replayed(self, event: Event) -> str:
        return self._message(
            event.topic, encode_cursor_entry(event.epoch, event.offset, event.time), encode_event(event)
        )

    def _confirmation(
        self, frame: Subscribe, pos: Position, cursor: Cursor | None, *, recovered: bool, start: int
    ) -> str:
        # The position just before the first event that follows; with the time of the
        # cursor (the client's, or the identity's stored one) when the replay starts at it.
        time = cursor.time if cursor is not None and recovered and cursor.offset == start else None
        confirmation = super()._confirmation(frame, pos, cursor, recovered=recovered, start=start)
        return self._message(frame.topic, encode_cursor_entry(pos.epoch, start, time), confirmation)

    # --- the carrier ---------------------------------------------------------------

    async def _send(self, frame: str) -> bool:
        try:
            await self._send_asgi({"type": "http.response.body", "body": frame.encode(), "more_body": True})
        except Exception as exc:  # OSError, ClientDisconnect, a server's own "connection lost"
            self._lost(exc)
            return False
        return True

    async def _close(self) -> None:
        """End the response: the client reconnects with its ``Last-Event-ID`` and resumes."""
        await self._send_asgi({"type": "http.response.body", "body": b"", "more_body": False})

    async def _reader(self) -> None:
        """Start the joined topics (in a task of the stream), then wait for the client to leave."""
        assert self._tg is not None  # run() sets it before calling the reader
        self._tg.start_soon(self._start_topics)
        receive = self._receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                return

    async def join_all(self) -> Refusal | None:
        """Authorize and join every topic, before the response starts.

        Returns the refusal to answer with (403 for a topic ``authorize``
        refuses, naming it; 500 when ``authorize`` fails; 503 when the store
        cannot be reached; 400 ``too_many_subscriptions`` when the topics'
        cursor lists could outgrow ``MAX_CURSOR_LIST_LENGTH``), or None when
        every topic is joined. Whatever was joined is left by :meth:`run`'s
        clean-up, or by :meth:`leave_all`. Cancelling is safe when the caller
        then calls :meth:`leave_all` (``SSEEndpoint.serve`` does).
        """
        for frame in self._subscribes:
            try:
                if not await self._authorized(frame.topic, None):
                    return Refusal(403, ErrorCode.FORBIDDEN, f"not allowed to subscribe to {frame.topic!r}")
            except FrameError as exc:
                return Refusal(500 if exc.code is ErrorCode.INTERNAL else 403, exc.code, exc.message)
        for frame in self._subscribes:
            try:
                sub, cursor, pos = await self._join(frame)
            except FrameError as exc:
                return Refusal(503, exc.code, exc.message)
            self._joined.append((frame, sub, cursor, pos))
        if not cursor_list_fits([pos.epoch for _, _, _, pos in self._joined]):
            # Its id: lines could outgrow what a reconnect may send: refused now, not then.
            return Refusal(
                400,
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"{len(self._joined)} topics do not fit one stream's cursor list (8192 characters): "
                "split them over several streams",
            )
        return None

    async def leave_all(self) -> None:
        """Leave every joined topic: a stream refused after :meth:`join_all`, or never started. Shielded."""
        with anyio.CancelScope(shield=True):
            for sub in list(self.subs.values()):
                await self._hub.leave(sub)
            self.subs.clear()
            self._joined.clear()

    def open(self, retry: int) -> None:
        """Queue the ``retry:`` line the stream opens with (the writer sends it first, once :meth:`run` runs)."""
        self._push(encode_sse_retry(retry))

    async def _start_topics(self) -> None:
        joined, self._joined = self._joined, []
        for frame, sub, cursor, pos in joined:
            try:
                await self._start(frame, sub, cursor, pos)
            except FrameError as exc:  # the store failed before the `subscribed`: end, the client resumes
                self.abort(CloseCode.TRY_AGAIN_LATER, exc.message)
                return


async def _refuse(
    scope: Scope, receive: Receive, send: Send, refusal: Refusal, cors: list[tuple[bytes, bytes]]
) -> None:
    response = Response(
        encode_error(refusal.code, refusal.reason),
        status_code=refusal.status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )
    response.raw_headers += cors
    if refusal.status == 405:
        response.raw_headers.append((b"allow", b"GET"))
    await response(scope, receive, send)


class SSEEndpoint:
    """The SSE route's ASGI side: parse, admit (as the WebSocket handshake), join, then an :class:`EventStream`.

    Given its collaborators by the Replay: the WebSocket route's
    :class:`~starlette_replay.endpoint.Endpoint` (for :meth:`Endpoint.admit`),
    the registry, and what a stream is made with.
    """

    __slots__ = ("_authorize", "_endpoint", "_hub", "_limits", "_registry", "_retry", "_store")

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        registry: Registry,
        hub: Hub,
        store: EventStore,
        limits: Limits,
        authorize: Authorize | None,
        retry: int,
    ) -> None:
        self._endpoint = endpoint
        self._registry = registry
        self._hub = hub
        self._store = store
        self._limits = limits
        self._authorize = authorize
        self._retry = retry

    def response(self, request: Request) -> Response:
        """The response for ``request``: a stream, or a refusal before any stream byte."""
        return EventStreamResponse(lambda receive, send: self.serve(request, receive, send))

    def _cors(self, request: Request) -> list[tuple[bytes, bytes]]:
        """CORS headers for a page of another origin that the origin rule allows (else none).

        The origin rule is the WebSocket handshake's: the origins allowed to use
        the browser's cookies on this route. A browser shows such a page the
        stream (and a refusal's body) only with these headers.
        """
        origin = request.headers.get("origin")
        if origin is None or not origin_allowed(
            origin, request.headers.get("host"), request.url.scheme, self._endpoint.allowed_origins
        ):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"origin"),
        ]

    async def serve(self, request: Request, receive: Receive, send: Send) -> None:
        """Answer one SSE request from its first byte to its last. Never raises (a failed send is the client gone)."""
        conn_id = secrets.token_hex(4)
        scope = request.scope
        cors = self._cors(request)
        if request.method != "GET":  # Starlette routes HEAD to a GET endpoint: a stream has no HEAD
            await _refuse(scope, receive, send, Refusal(405, ErrorCode.BAD_REQUEST, "use GET"), cors)
            return
        params = request.query_params
        cursor_list = request.headers.get("last-event-id")
        if cursor_list is None:
            cursor_list = params.get("last_event_id")
        try:
            parsed: StreamRequest = parse_stream_request(
                params.getlist("topic"),
                params.getlist("rewind"),
                cursor_list,
                max_subscriptions=self._limits.max_subscriptions,
            )
        except FrameError as exc:
            logger.info("[%s] stream refused: %s", conn_id, exc.message)
            await _refuse(scope, receive, send, Refusal(400, exc.code, exc.message), cors)
            return
        try:
            identity = await self._endpoint.admit(request, conn_id)
        except Refusal as admission:
            await _refuse(scope, receive, send, admission, cors)
            return
        stream = EventStream(
            request,
            send,
            receive,
            identity,
            conn_id,
            parsed.subscribes,
            hub=self._hub,
            store=self._store,
            limits=self._limits,
            authorize=self._authorize,
        )
        registry = self._registry
        # Reserved with no await since admit() checked the identity's limit (as on the WebSocket route).
        registry.reserve(stream)
        try:
            try:
                refusal = await stream.join_all()
            except BaseException:  # cancelled (the server gave up on the request), or a bug
                await stream.leave_all()
                raise
            if refusal is None and stream.close_code is not None:
                # Revoked, shut down or already too slow while it joined.
                if stream.close_code == CloseCode.POLICY_VIOLATION:
                    refusal = Refusal(403, ErrorCode.FORBIDDEN, stream.close_reason)
                else:
                    refusal = Refusal(503, ErrorCode.UNAVAILABLE, stream.close_reason)
            if refusal is not None:
                logger.info("[%s] stream refused with %d: %s", conn_id, refusal.status, refusal.reason)
                await stream.leave_all()
                await _refuse(scope, receive, send, refusal, cors)
                return
            try:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + cors})
            except Exception as exc:  # the client left already
                logger.debug("[%s] client gone before the stream started: %r", conn_id, exc)
                await stream.leave_all()
                return
            stream.open(self._retry)
            logger.debug("[%s] stream started (identity=%r, topics=%d)", conn_id, identity, len(parsed.subscribes))
            await registry.serve(stream)
        finally:
            registry.release(stream)
        logger.debug("[%s] stream ended (%s)", conn_id, stream.close_code)


class EventStreamResponse(Response):
    """A response that is written by a callable given ``receive`` and ``send`` (the SSE route's)."""

    def __init__(self, serve: Callable[[Receive, Send], Awaitable[None]]) -> None:
        # Nothing of Response's own is sent: __call__ writes the stream, or a refusal.
        super().__init__(status_code=200)
        self._serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(receive, send)
