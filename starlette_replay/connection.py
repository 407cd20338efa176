"""One accepted WebSocket: its send queue, its subscriptions, its frame handling.

The SSE route's streams (``sse.py``) are Connections too: the same queue,
writer, limits and replay -> live hand-off (:meth:`Connection._join` then
:meth:`Connection._start`), with another carrier (an HTTP response body) and no
client frames.

The *reader* (the endpoint's task) handles the client's frames one at a time,
in order (an ``ack`` is stored before the next frame is read). Frames to the
client go out in one order, one send at a time:

- Inline (asyncio on Python 3.12+): a frame pushed while nothing is queued
  is sent at once, up to ``_INLINE_PER_TURN`` frames per connection per
  event-loop turn, in an *eager task* of the connection
  (``asyncio.Task(..., eager_start=True)`` in the connection's context): the
  send runs to completion inside the push when the socket takes the frame, and
  otherwise goes on later in that task, never in the pushing task (the hub's
  caller, the reader, the heartbeat timer). Middleware around ``send`` that
  binds to the current task (``asyncio.timeout``, a ContextVar set and reset,
  a tracing span) binds to the send's own task. When events come one at a
  time, waking a task per connection per event costs about as much as the
  send, which is all a bare broadcast loop pays.
- Otherwise (a burst past that bound, something queued, Python 3.11, trio)
  the frame is queued for the *writer*, a task of the connection's task group
  started for it, which sends the queue and then parks until woken for more
  (on asyncio, on a bare future: an ``anyio.Event`` per wake-up tripled the
  per-frame cost on 3.11, where every frame is woken for).
  A send that has to wait (the socket's buffer is full) is left to its task;
  the writer waits for it to finish before it sends anything else.

The Replay's one heartbeat timer queues a ``ping`` on a connection that has
been idle for ``heartbeat_interval`` and retires its parked writer, so an idle
connection holds no task but its reader.

Live frames (pushed by the hub, never awaiting) count toward
``send_queue_size``; past it the connection is closed with 1013. Replayed
events and replies go the same way, but the reader waits until they have been
sent, so they are paced by the socket and need no bound of their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from .errors import StoreUnavailable
from .events import Event
from .hub import Hub, Subscription
from .protocol import (
    Ack,
    CloseCode,
    ErrorCode,
    FrameError,
    Ping,
    Subscribe,
    Unsubscribe,
    encode_event,
    encode_ping,
    encode_pong,
    encode_subscribed,
    encode_unsubscribed,
    parse_client_frame,
)
from .stores.base import Cursor, EventStore, Position

__all__ = ["AsgiSend", "Authorize", "Connection", "Limits", "WriterState"]

# The app's hook that allows (True) or refuses a subscribe: (conn, topic) -> bool | Awaitable[bool], where
# conn is the request's HTTPConnection: a WebSocket on the WebSocket route, a Request on the SSE route.
Authorize = Callable[[HTTPConnection, str], "bool | Awaitable[bool]"]

# An ASGI send (what a connection writes its frames with).
AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]

logger = logging.getLogger("starlette_replay.connection")

# Sent frames the writer drops from the front of a send queue that has not emptied.
_COMPACT_AT = 256

# Replies the reader may have queued before it waits for the writer.
_REPLY_BACKLOG = 32

# Inline sends per connection in one event-loop turn. A publisher that fell a few
# events behind an open-loop schedule publishes them in one turn: still inline (as
# a bare broadcast would send them). More is a burst: the writer batches the rest.
_INLINE_PER_TURN = 8


# Eager tasks (run the first step at once, in the task's own identity and context)
# came with Python 3.12. Without them a frame is never sent from another task:
# every frame goes through the writer.
_EAGER_TASKS = sys.version_info >= (3, 12)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, else None (trio, or an anyio too old to tell).

    On asyncio the writer parks on a bare future (an ``anyio.Event`` costs about
    as much again per wake-up), and on Python 3.12+ frames are sent inline.
    """
    try:
        loop = anyio.lowlevel.current_token().native_token
    except Exception:
        return None
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def _asgi_send(websocket: Any) -> AsgiSend:
    """The ASGI ``send`` under ``websocket`` (Starlette's, or any object with its ``send``), for the text frames.

    Starlette's ``WebSocket.send`` runs its state checks on every call: 1.5 to
    2 µs a frame here (``bench.micro frames``), more than the rest of the
    library's per-frame path. The connection owns the socket from accept to
    close and sends nothing but text frames in between (the close still goes
    through ``websocket.close``), so those frames go to the ASGI send directly;
    a failed send is the peer gone either way. A ``send`` that is not
    Starlette's own (a subclass overriding it, a test double) is used as it is.
    """
    send = getattr(websocket, "_send", None)
    if callable(send) and type(websocket).send is WebSocket.send:
        return send  # type: ignore[no-any-return]
    fallback: AsgiSend = websocket.send
    return fallback


class WriterState(enum.IntEnum):
    """Where a connection's writer task is. Ordered: from ``SENDING`` on, the writer is busy.

    ``ABSENT`` -> ``SENDING`` when a frame must wait (:meth:`Connection._kick` starts it);
    ``SENDING`` -> ``PARKED`` when the queue is empty; ``PARKED`` -> ``SENDING`` when
    woken for more; ``PARKED`` -> ``RETIRING`` when the heartbeat retires an idle
    writer (it sends what is queued, the ping, then ends); ``SENDING`` or
    ``RETIRING`` -> ``ABSENT`` when the writer task ends.
    """

    ABSENT = 0  # no writer task: the next frame that must wait starts one
    PARKED = 1  # waiting on its wake-up for the next frame
    SENDING = 2  # sending the queue, or waiting for an inline send that had to wait
    RETIRING = 3  # sending what is queued, then ending


# The members as module constants: an enum member looked up on its class costs a
# descriptor call per use on Python 3.11, on a path that runs once per frame.
_ABSENT, _PARKED, _SENDING, _RETIRING = (
    WriterState.ABSENT,
    WriterState.PARKED,
    WriterState.SENDING,
    WriterState.RETIRING,
)


def _not_subscribed(frame: Ack | Unsubscribe) -> FrameError:
    return FrameError(ErrorCode.NOT_SUBSCRIBED, "not subscribed to this topic", ref=frame.ref, topic=frame.topic)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits (see :class:`~starlette_replay.Replay` for the meaning)."""

    send_queue_size: int = 1024
    max_message_size: int = 65536
    max_subscriptions: int = 100
    heartbeat_interval: float = 25.0
    replay_page_size: int = 500
    max_bad_frames: int = 100
    bad_frames_window: float = 60.0
    max_frame_rate: float = 100.0
    frame_burst: int = 200
    close_timeout: float = 5.0


class Connection:
    """Server side of one client connection. Created by the endpoint after ``accept``."""

    # Slots: an idle connection is mostly this object; a __dict__ would cost ~1 KB more.
    __slots__ = (
        "_authorize",
        "_backlog_at",
        "_bad_frames",
        "_context",
        "_gone",
        "_head",
        "_hub",
        "_idle_since",
        "_inflight",
        "_inline_count",
        "_inline_turn",
        "_loop",
        "_metrics",
        "_progress",
        "_queue",
        "_queued",
        "_scope",
        "_send_asgi",
        "_sent",
        "_sent_at_beat",
        "_store",
        "_tg",
        "_tokens",
        "_tokens_at",
        "_unfinished",
        "_wakeup",
        "_writer_state",
        "close_code",
        "close_reason",
        "handshake",
        "id",
        "identity",
        "limits",
        "live_queued",
        "subs",
    )

    # What the heartbeat sends after heartbeat_interval of silence.
    ping_frame = encode_ping()
    transport = "websocket"  # what carries the frames (metrics tell WebSocket connections from SSE streams)

    def __init__(
        self,
        handshake: HTTPConnection,
        identity: str | None,
        conn_id: str,
        *,
        hub: Hub,
        store: EventStore,
        limits: Limits,
        authorize: Authorize | None,
        send: AsgiSend | None = None,
    ) -> None:
        """One accepted connection of ``identity``, with what it works with: the
        ``hub`` it joins topics on, the ``store`` it replays from and saves cursors
        to, its ``limits`` and the app's ``authorize`` hook.

        ``handshake`` is the request it was opened with (what the hooks get): a
        ``WebSocket``, whose ASGI send it writes to, or a ``Request`` (the SSE
        route), which needs the response's ``send``.
        """
        self.handshake = handshake
        self._send_asgi = send if send is not None else _asgi_send(handshake)
        self.identity = identity
        self.id = conn_id
        self._hub = hub
        self._metrics = hub.metrics
        self._store = store
        self._authorize = authorize
        self.limits = limits
        self._backlog_at = self.limits.send_queue_size // 2
        self.subs: dict[str, Subscription] = {}
        # The send queue: frames from _head on are unsent. A list, emptied whenever the
        # writer catches up, costs an idle connection far less than a deque's first block.
        self._queue: list[tuple[str, bool]] = []
        self._head = 0
        self.live_queued = 0  # live frames queued or buffered in subscriptions
        self._queued = 0  # frames ever queued
        self._sent = 0  # frames ever sent
        # The writer: a task of ``_tg`` (set while run() runs) unless ABSENT; parked on
        # ``_wakeup`` (a bare future on asyncio: cheaper than an anyio.Event).
        self._writer_state = _ABSENT
        self._wakeup: asyncio.Future[None] | anyio.Event | None = None
        self._unfinished = False  # a send started and has not finished (see _flush)
        self._tg: anyio.abc.TaskGroup | None = None
        # For the heartbeat timer: when it last saw frames sent, and how many by then
        # (a clock read per frame would cost more than the timer's tick).
        self._idle_since = time.monotonic()
        self._sent_at_beat = 0
        self._progress: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._gone = False
        self._tokens = float(self.limits.frame_burst)
        self._tokens_at = time.monotonic()
        self._bad_frames: deque[float] | None = None  # made on the first bad frame
        # The connection's context (its ASGI task's), where every send runs; the asyncio
        # loop (None under trio; inline sends need 3.12+ too); the loop turn of this
        # connection's last inline send; an inline send that has to wait (its task).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self._inline_turn = -1
        self._inline_count = 0
        self._inflight: asyncio.Task[bool] | None = None

    def __repr__(self) -> str:
        return f"Connection({self.id}, identity={self.identity!r}, topics={len(self.subs)})"

    # --- the send queue (synchronous: called by the hub on the publish path) --------

    @property
    def sent(self) -> int:
        """Frames sent so far."""
        return self._sent

    @property
    def queued(self) -> int:
        """Frames waiting to be written, plus live events held back during replays."""
        return len(self._queue) - self._head + sum(len(sub.pending) for sub in self.subs.values())

    def count_live(self, n: int) -> None:
        self.live_queued += n
        if n > 0 and self.live_queued > self._backlog_at:
            # A publisher that never waits (a loop over a MemoryStore) must let
            # the writers run before a prompt reader looks like a slow one.
            self._hub.backlogged = True
            if self.live_queued > self.limits.send_queue_size and self.close_code is None:
                self._metrics.slow_consumer_closes += 1
                self.abort(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def push_live(self, frame: str, event: Event) -> None:
        """Send or queue ``event``'s live ``frame``: :meth:`_push` for the hub, spelt out (once per frame)."""
        self._queued += 1
        if self._queue or self._writer_state >= _SENDING or not self._send_inline(frame):
            self._queue.append((frame, True))
            self.count_live(1)
            self._kick()

    def _push(self, frame: str) -> int:
        """Send or queue a reply, replayed event or ping; returns its number (see :meth:`_drained`)."""
        self._queued += 1
        if self._queue or self._writer_state >= _SENDING or not self._send_inline(frame):
            self._queue.append((frame, False))
            self._kick()
        return self._queued

    def _send_inline(self, frame: str) -> bool:
        """Start sending ``frame`` now, in an eager task of this connection; False when it must be queued instead.

        Called only when nothing is queued and the writer is parked or absent.
        True means the frame is sent, or its send waits (for a full socket
        buffer) in its own task and the writer waits for it before anything
        else, or the peer is gone (the connection then stops). Nothing of the
        send runs as the calling task: the caller may be the publisher.
        """
        loop, context = self._loop, self._context
        if not _EAGER_TASKS or loop is None or context is None or self.close_code is not None or self._gone:
            return False
        hub = self._hub
        if self._inline_turn != hub.turn:
            self._inline_turn, self._inline_count = hub.turn, 0
        elif self._inline_count >= _INLINE_PER_TURN:
            return False  # a burst: the writer sends the rest of it in one go
        self._inline_count += 1
        if not hub.turn_ending:
            hub.used_turn(loop)
        if sys.version_info < (3, 12):  # pragma: no cover - for the type checker: _EAGER_TASKS above
            return False
        task = asyncio.Task(self._send(frame), loop=loop, context=context, eager_start=True)
        if not task.done():  # the send waits: in its task, and the writer waits for that
            self._inflight = task
            self._unfinished = True
            self._kick()
        elif task.cancelled():
            self._lost(asyncio.CancelledError("the send was cancelled"))
        elif task.result():
            self._sent += 1  # _count_sent(False), spelt out: this runs once per frame
            if self._progress is not None:
                self._progress.set()
                self._progress = None
        return True

    def _kick(self) -> None:
        """Have what waits sent: wake the parked writer, or start one."""
        if self._wakeup is not None:
            wakeup, self._wakeup = self._wakeup, None
            if self._writer_state is _PARKED:
                self._writer_state = _SENDING  # RETIRING stays: it sends, then ends
            if isinstance(wakeup, anyio.Event):
                wakeup.set()
            elif not wakeup.done():  # a future the cancelled writer left behind is done
                wakeup.set_result(None)
        elif self._writer_state is _ABSENT and self._tg is not None and self.close_code is None and not self._gone:
            self._writer_state = _SENDING
            assert self._context is not None  # set with _tg
            self._context.run(self._tg.start_soon, self._writer)  # in the connection's context

    def _count_sent(self, live: bool) -> None:
        if live:
            self.live_queued -= 1
        self._sent += 1
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _lost(self, exc: BaseException) -> None:
        """A send failed: the peer is gone; stop the connection (nothing to close)."""
        logger.debug("[%s] send failed, peer gone: %r", self.id, exc)
        self._gone = True
        if self._scope is not None:
            self._scope.cancel()

    async def _drained(self, seq: int) -> None:
        """Wait until the frame numbered ``seq`` has been sent."""
        while self._sent < seq:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    async def _reply(self, frame: str) -> None:
        seq = self._push(frame)
        if seq - self._sent > _REPLY_BACKLOG:
            await self._drained(seq - _REPLY_BACKLOG)

    def abort(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` as soon as possible. Synchronous, idempotent."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            logger.info("[%s] closing with %d: %s", self.id, code, reason)
        if self._scope is not None:
            self._scope.cancel()

    # --- running ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves or it is aborted. Never raises."""
        self._loop = _asyncio_loop()
        self._context = contextvars.copy_context()
        try:
            async with anyio.create_task_group() as tg:
                self._tg, self._scope = tg, tg.cancel_scope  # cancels the reader and the writer
                if self.close_code is not None:
                    self._scope.cancel()
                if self._queue:
                    self._kick()  # a heartbeat ping queued before
                await self._reader()
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("[%s] unexpected error", self.id)
            self.abort(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._tg = self._loop = None  # no more writers, no more inline sends
            with anyio.CancelScope(shield=True):
                inflight, self._inflight = self._inflight, None
                if inflight is not None and not inflight.done():
                    inflight.cancel()  # a send that waited: no writer finishes it now
                    with anyio.move_on_after(self.limits.close_timeout):
                        await asyncio.wait((inflight,))
                for sub in list(self.subs.values()):
                    await self._hub.leave(sub)
                self.subs.clear()
                if self.close_code is not None and not self._gone:
                    await self._flush()
                    with anyio.move_on_after(self.limits.close_timeout):
                        try:
                            await self._close()
                        except Exception:  # the peer went away meanwhile
                            pass

    async def _close(self) -> None:
        """End the carrier after an abort: the close frame, with ``close_code``."""
        websocket: Any = self.handshake  # a WebSocket (the SSE stream overrides _close)
        await websocket.close(self.close_code, self.close_reason)

    async def _flush(self) -> None:
        """Before the close frame: send what is queued, as far as the socket takes it at once.

        Frames queued just before an abort (the replies and ``rate_limited``
        errors to a flood of frames, say) then reach the client ahead of the
        close. Runs in the connection's own task, in a cancelled scope: a send
        that would wait is cancelled where it first suspends, and the rest is
        dropped. Nothing goes out after a send that did not finish (no hole).
        """
        queue = self._queue
        with anyio.CancelScope() as scope:
            scope.cancel()
            while not self._unfinished and self._head < len(queue):
                self._unfinished = True
                if not await self._send(queue[self._head][0]):
                    return
                self._unfinished = False
                self._head += 1
                self._sent += 1  # counted as sent (metrics), the live ones too: nothing waits on them now

    async def _send(self, frame: str) -> bool:
        """Send one text frame from the calling task (see :func:`_asgi_send`).

        False when the send failed: the peer is gone and the connection stops.
        The ASGI send is called inside the ``try``: a send that is a plain
        function may raise as it is called.
        """
        try:
            await self._send_asgi({"type": "websocket.send", "text": frame})
        except Exception as exc:  # WebSocketDisconnect, ClientDisconnected, RuntimeError, OSError
            self._lost(exc)
            return False
        return True

    async def _finish_inline_send(self, task: asyncio.Task[bool]) -> bool:
        """Wait for a send that had to wait, in its own task; False when it failed.

        Waits without cancelling the task when the writer is cancelled: ``run``
        cancels and awaits it then.
        """
        if not task.done():
            await asyncio.wait((task,))
        self._inflight = None
        if task.cancelled():
            self._lost(asyncio.CancelledError("the send was cancelled"))
            return False
        return task.result()

    async def _stop(self, code: int, reason: str) -> NoReturn:
        """Abort with ``code`` and unwind the reader."""
        self.abort(code, reason)
        await anyio.sleep_forever()  # raises at once: our scope is cancelled
        raise AssertionError("unreachable")

    def heartbeat(self, now: float, interval: float) -> None:
        """Called by the Replay's timer: after ``interval`` seconds with nothing sent,
        send a ``ping`` and retire the parked writer (the next frames start one).

        A frame sent since the last tick counts as sent at this tick: with ticks
        ``interval / 4`` apart, a ping follows 1 to 1.25 intervals of silence.
        """
        if self._sent != self._sent_at_beat:
            self._sent_at_beat = self._sent
            self._idle_since = now
            return
        if self._queue or self._writer_state >= _SENDING or now - self._idle_since < interval:
            return
        if self._writer_state is _PARKED:
            self._writer_state = _RETIRING  # the ping is queued for it, then it ends
        self._push(self.ping_frame)

    async def _writer(self) -> None:
        """Send what is in flight and queued; park when done; end when retired."""
        queue = self._queue
        loop = self._loop
        try:
            while True:
                if self._inflight is not None:
                    if not await self._finish_inline_send(self._inflight):
                        return
                    self._unfinished = False
                    self._count_sent(False)
                    continue
                head = self._head
                if head == len(queue):
                    queue.clear()
                    self._head = 0
                    if self._writer_state is _RETIRING:
                        return
                    self._writer_state = _PARKED
                    if loop is not None:
                        self._wakeup = future = loop.create_future()
                        await future
                    else:
                        self._wakeup = event = anyio.Event()
                        await event.wait()
                    continue
                frame, live = queue[head]
                if head >= _COMPACT_AT:
                    del queue[:head]  # a queue that never empties must not grow without end
                    self._head = 0
                self._head += 1
                self._unfinished = True
                if not await self._send(frame):
                    return
                self._unfinished = False
                self._count_sent(live)
        finally:
            self._writer_state = _ABSENT
            self._wakeup = None

    async def _reader(self) -> None:
        websocket: Any = self.handshake  # a WebSocket (the SSE stream overrides _reader)
        receive = websocket.receive
        max_size = self.limits.max_message_size
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self._gone = True
                return
            text: str | None = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
            elif len(text) * 4 <= max_size:  # UTF-8 takes at most 4 bytes a character
                size = 0
            else:
                size = len(text.encode("utf-8", "surrogatepass"))
            if size > max_size:
                await self._stop(CloseCode.MESSAGE_TOO_BIG, f"frame larger than {max_size} bytes")
            if await self._rate_limited(text):
                continue
            try:
                if text is None:
                    raise FrameError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
                await self._handle(parse_client_frame(text))
            except FrameError as exc:
                await self._refuse(exc)

    async def _rate_limited(self, text: str | None) -> bool:
        """Frame rate limit: a token bucket that may go into debt by one burst.

        True when the frame must be dropped (a ``rate_limited`` error is queued,
        with the frame's ref and topic so the client knows which one to send
        again); past the debt the connection is closed with 1008.
        """
        limits = self.limits
        now = time.monotonic()
        self._tokens = min(float(limits.frame_burst), self._tokens + (now - self._tokens_at) * limits.max_frame_rate)
        self._tokens_at = now
        self._tokens -= 1
        if self._tokens >= 0:
            return False
        if self._tokens < -limits.frame_burst:
            await self._stop(CloseCode.POLICY_VIOLATION, "frame rate limit exceeded")
        ref: Any = None
        topic: str | None = None
        if text is not None:
            try:
                frame = parse_client_frame(text)
                ref, topic = frame.ref, getattr(frame, "topic", None)
            except FrameError as exc:
                ref, topic = exc.ref, exc.topic
        message = "frame dropped: too many frames per second"
        self._push(FrameError(ErrorCode.RATE_LIMITED, message, ref=ref, topic=topic).encode())
        return True

    async def _refuse(self, error: FrameError) -> None:
        if error.code == ErrorCode.BAD_REQUEST:
            now = time.monotonic()
            window = self._bad_frames
            if window is None:
                window = self._bad_frames = deque()
            window.append(now)
            while window and now - window[0] > self.limits.bad_frames_window:
                window.popleft()
            if len(window) > self.limits.max_bad_frames:
                await self._stop(CloseCode.POLICY_VIOLATION, "too many bad frames")
        await self._reply(error.encode())

    # --- frames ----------------------------------------------------------------------

    async def _handle(self, frame: Subscribe | Unsubscribe | Ack | Ping) -> None:
        if isinstance(frame, Ping):
            await self._reply(encode_pong(frame.ref))
        elif isinstance(frame, Ack):
            await self._ack(frame)
        elif isinstance(frame, Subscribe):
            await self._subscribe(frame)
        else:
            if frame.topic not in self.subs:
                raise _not_subscribed(frame)
            await self._drop(frame.topic)
            await self._reply(encode_unsubscribed(frame.topic, frame.ref))

    async def _drop(self, topic: str) -> None:
        sub = self.subs.pop(topic)
        self.count_live(-len(sub.pending))
        sub.pending.clear()
        await self._hub.leave(sub)

    async def _ack(self, frame: Ack) -> None:
        sub = self.subs.get(frame.topic)
        if sub is None:
            raise _not_subscribed(frame)
        # A client can only have processed what this subscription sent it. Storing
        # more (an offset past it, or a late ack from an epoch the topic has left)
        # would make its next resume report a gap that never happened.
        if frame.epoch != sub.epoch or frame.offset > sub.last:
            raise FrameError(
                ErrorCode.BAD_REQUEST,
                f"ack past what this subscription delivered (epoch {sub.epoch}, offset {sub.last})",
                ref=frame.ref,
                topic=frame.topic,
            )
        if self.identity is None:
            return
        stamp = frame.time
        try:
            if stamp is None and frame.offset > 0:
                # The cursor carries the acked event's time ("Reused offsets"); a client that
                # did not send it gets the stored one (none when that event is trimmed).
                page = await self._store.read(frame.topic, frame.offset - 1, 1)
                if page and page[0].offset == frame.offset and page[0].epoch == frame.epoch:
                    stamp = page[0].time
            await self._store.save_cursor(self.identity, frame.topic, Cursor(frame.epoch, frame.offset, stamp))
        except StoreUnavailable as exc:
            raise FrameError(
                ErrorCode.UNAVAILABLE, f"cursor not stored: {exc}", ref=frame.ref, topic=frame.topic
            ) from None

    async def _authorized(self, topic: str, ref: Any) -> bool:
        authorize = self._authorize
        if authorize is None:
            raise FrameError(
                ErrorCode.FORBIDDEN,
                "no topic is allowed: pass authorize=<callable(conn, topic) -> bool> to Replay "
                "(or authorize=allow_all for a demo)",
                ref=ref,
                topic=topic,
            )
        try:
            result = authorize(self.handshake, topic)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            logger.exception("[%s] authorize(%r) raised", self.id, topic)
            raise FrameError(ErrorCode.INTERNAL, "authorization failed", ref=ref, topic=topic) from None
        return result is True

    async def _subscribe(self, frame: Subscribe) -> None:
        topic, ref = frame.topic, frame.ref
        if topic in self.subs:
            await self._drop(topic)
        elif len(self.subs) >= self.limits.max_subscriptions:
            raise FrameError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.limits.max_subscriptions} subscriptions per connection",
                ref=ref,
                topic=topic,
            )
        if not await self._authorized(topic, ref):
            raise FrameError(ErrorCode.FORBIDDEN, "not allowed to subscribe to this topic", ref=ref, topic=topic)
        sub, cursor, pos = await self._join(frame)
        await self._start(frame, sub, cursor, pos)

    async def _join(self, frame: Subscribe) -> tuple[Subscription, Cursor | None, Position]:
        """Steps 1 and 2 of the replay -> live hand-off (ARCHITECTURE.md): register, confirm, read the head.

        Returns the subscription (held in ``subs``, buffering live events), the
        cursor to resume from (``frame``'s, else the identity's stored one, else
        None) and the topic's position, read after the store confirmed live
        delivery. Raises ``FrameError`` (``unavailable``) with nothing held when
        the store cannot be reached. The SSE route joins every topic of a stream
        before it answers, so that an unreachable store is a 503.
        """
        topic, ref = frame.topic, frame.ref
        store = self._store
        cursor: Cursor | None = None
        sub = Subscription(self, topic)
        self.subs[topic] = sub
        try:
            if frame.epoch is not None and frame.offset is not None:
                cursor = Cursor(frame.epoch, frame.offset, frame.time)
            elif self.identity is not None:
                cursor = await store.load_cursor(self.identity, topic)
            await self._hub.join(sub)
            pos = await store.position(topic)
        except StoreUnavailable as exc:
            if self.subs.get(topic) is sub:
                await self._drop(topic)
            raise FrameError(ErrorCode.UNAVAILABLE, f"store unavailable: {exc}", ref=ref, topic=topic) from None
        return sub, cursor, pos

    async def _start(self, frame: Subscribe, sub: Subscription, cursor: Cursor | None, pos: Position) -> None:
        """Steps 3 to 6 of the hand-off: decide where the replay starts, confirm, replay, go live.

        For the WebSocket and the SSE route alike. Raises ``FrameError``
        (``unavailable``) before the confirmation when the store cannot be
        read; ends the connection (1013) when the replay cannot be completed.
        """
        topic = frame.topic
        start, recovered, first_page = await self._resume_point(frame, sub, cursor, pos)
        await self._reply(self._confirmation(frame, pos, cursor, recovered=recovered, start=start))
        try:
            last = await self._replay(topic, pos.epoch, start, pos.head, first_page)
        except StoreUnavailable as exc:
            await self._stop(CloseCode.TRY_AGAIN_LATER, f"store unavailable during replay: {exc}")
        if last != pos.head:
            await self._stop(CloseCode.TRY_AGAIN_LATER, f"history of {topic!r} changed during replay")
        sub.go_live(pos.epoch, last)

    async def _resume_point(
        self, frame: Subscribe, sub: Subscription, cursor: Cursor | None, pos: Position
    ) -> tuple[int, bool, list[Event] | None]:
        """The resume decision, in one place for both routes: where the replay starts, whether it is recovered.

        Returns ``(start, recovered, first_page)``: the replay sends the events
        ``start+1 .. pos.head``; ``first_page`` is the first page of them when
        it was read already. ``cursor`` is the one to resume from (``frame``'s,
        with its ``time``, or the identity's stored one); without one,
        ``frame.rewind`` events are replayed. The decision is counted in the
        metrics. Raises ``FrameError`` (``unavailable``), with ``sub`` dropped,
        when the store cannot be read.
        """
        topic, ref = frame.topic, frame.ref
        store = self._store
        oldest_cursor = pos.oldest - 1
        page_size = self.limits.replay_page_size
        first_page: list[Event] | None = None
        reason: str | None = None  # why not recovered, when the position alone cannot tell (for metrics)
        try:
            if cursor is not None:
                recovered = cursor.epoch == pos.epoch and oldest_cursor <= cursor.offset <= pos.head
                start = cursor.offset if recovered else oldest_cursor
                if recovered and cursor.time is not None and cursor.offset >= pos.oldest:
                    # "Reused offsets": the stored event at the cursor must be the one the client
                    # had. Read it with the first page, in the same round trip.
                    page = await store.read(topic, start - 1, min(page_size, pos.head - start) + 1)
                    if page and page[0].offset == start and page[0].epoch == pos.epoch:
                        if page[0].time == cursor.time:
                            first_page = page[1:]
                        else:
                            logger.info(
                                "[%s] resume of %r at offset %d: the stored event's time %d is not the "
                                "client's %d (the store reused the offset); replaying what it retains",
                                self.id,
                                topic,
                                start,
                                page[0].time,
                                cursor.time,
                            )
                            recovered = False
                            reason = "reused_offset"
                            start = oldest_cursor
                    # else: trimmed meanwhile, so it cannot tell; the read below finds the hole
            else:
                recovered = False
                start = max(oldest_cursor, pos.head - frame.rewind)
            if start < pos.head and first_page is None:
                # Read the first page before answering: on a full topic every publish trims
                # the oldest event, so the oldest may be gone since the head was read. Then
                # the replay starts after the hole (a gap: not recovered) instead of closing
                # with 1013, which would send the client back into the same race.
                first_page = await store.read(topic, start, min(page_size, pos.head - start))
        except StoreUnavailable as exc:
            if self.subs.get(topic) is sub:
                await self._drop(topic)
            raise FrameError(ErrorCode.UNAVAILABLE, f"store unavailable: {exc}", ref=ref, topic=topic) from None
        if first_page and first_page[0].epoch == pos.epoch and first_page[0].offset > start + 1:
            start = first_page[0].offset - 1
            recovered = False
        self._metrics.subscribed(cursor, pos, start, recovered, reason)
        return start, recovered, first_page

    def _confirmation(
        self, frame: Subscribe, pos: Position, cursor: Cursor | None, *, recovered: bool, start: int
    ) -> str:
        """The ``subscribed`` frame for ``frame``, resumed from ``cursor`` (or not): the replay follows
        from ``start`` to ``pos.head``."""
        return encode_subscribed(
            frame.topic,
            pos.epoch,
            pos.head,
            resumed=cursor is not None,
            recovered=recovered,
            replayed=pos.head - start,
            ref=frame.ref,
        )

    def _replayed(self, event: Event) -> str:
        """The frame of a replayed ``event``."""
        return encode_event(event)

    async def _replay(self, topic: str, epoch: str, after: int, head: int, page: list[Event] | None) -> int:
        """Queue the stored events ``after+1 .. head``, paced by the socket.

        ``page`` is the first page when it was read already. Returns the offset
        of the last event queued, which is less than ``head`` when the store no
        longer has a contiguous history (trimmed or reset meanwhile).
        """
        store = self._store
        page_size = self.limits.replay_page_size
        previous_page_end = 0
        while after < head:
            if page is None:
                page = await store.read(topic, after, min(page_size, head - after))
            seq = 0
            page_start = after
            for event in page:
                if after == head:
                    break  # a trimmed store reads past the head: live events, held in the subscription
                if event.offset != after + 1 or event.epoch != epoch:
                    return after
                seq = self._push(self._replayed(event))
                after = event.offset
            self._metrics.events_replayed += after - page_start
            if not page:
                return after
            # Keep one page in flight while reading the next, no more.
            await self._drained(previous_page_end)
            previous_page_end = seq
            page = None
        return after
