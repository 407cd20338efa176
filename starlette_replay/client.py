"""A Python client for the ``replay.v1`` protocol: every event exactly once, in order, across reconnects.

::

    from starlette_replay.client import ReplayClient, Reset

    async with ReplayClient("wss://example.com/ws", topics=["user:42"]) as client:
        async for item in client:
            if isinstance(item, Reset):
                ...  # events may have been lost: refetch the topic's state from the app
            else:
                handle(item.topic, item.event, item.data)

The client keeps, per topic, the cursor (epoch, offset) of the last event it
received. It reconnects by itself (exponential backoff, full jitter) and
subscribes again from that cursor; an offset that skips ahead makes it
subscribe again from the last good offset, and an offset it already has is
dropped. When the server cannot resume from the cursor (``resumed`` and not
``recovered``: a new epoch after a store restart, or history trimmed past the
cursor) the iterator yields a :class:`Reset` before the topic's next events.

What the application has *processed* is tracked apart from what was received:
with ``auto_ack`` (the default) an item counts as processed when the
application asks for the next one (or leaves the ``async with`` block without
an exception). Processed cursors are acknowledged to the server (``acks=True``,
batched: at most one ``ack`` per topic per ``ack_interval`` unless
``ack_every`` events piled up) and handed to a :class:`CursorStore` at the same
points, so that a restarted process resumes where it left off.

The transport is the ``websockets`` library (the ``client`` extra) on asyncio.
See ``docs/client.md``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ._client.backoff import Backoff
from ._client.core import (
    TROUBLE_CLOSE,
    AckRefused,
    Action,
    ClientCore,
    Confirmed,
    Deliver,
    ErrorReceived,
    Item,
    Pacer,
    Refused,
    Reset,
    RetrySubscribe,
    Send,
    TopicState,
    Unmatched,
    close_stop,
    is_offset,
    status_retryable,
)
from ._client.cursors import CursorStore, FileCursorStore, MemoryCursorStore
from ._client.errors import (
    BadRequestError,
    ClientClosed,
    ClientStopped,
    ForbiddenError,
    HandshakeRejected,
    InternalServerError,
    NotSubscribedError,
    RateLimitedError,
    ReplayClientError,
    ServerClosed,
    ServerError,
    TooManySubscriptionsError,
    UnavailableError,
)
from .events import Event
from .protocol import SUBPROTOCOL, Ack, CloseCode, Unsubscribe, check_topic, encode_client_frame, parse_server_frame
from .stores.base import Cursor

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskGroup
    from websockets.asyncio.client import ClientConnection

__all__ = [
    "Backoff",
    "BadRequestError",
    "ClientClosed",
    "ClientStopped",
    "Cursor",
    "CursorStore",
    "Event",
    "FileCursorStore",
    "ForbiddenError",
    "HandshakeRejected",
    "InternalServerError",
    "Item",
    "MemoryCursorStore",
    "NotSubscribedError",
    "RateLimitedError",
    "ReplayClient",
    "ReplayClientError",
    "Reset",
    "ServerClosed",
    "ServerError",
    "TooManySubscriptionsError",
    "UnavailableError",
]

logger = logging.getLogger("starlette_replay.client")


# --- the client --------------------------------------------------------------------------


class _Topic(TopicState):
    """The client's state for one subscribed topic: the rules' (:class:`TopicState`) and the application's."""

    __slots__ = ("acked", "confirmed", "error", "processed", "saved", "unflushed", "waiters")

    def __init__(self, name: str, cursor: Cursor | None, rewind: int) -> None:
        super().__init__(name, cursor, rewind)
        self.confirmed = anyio.Event()
        self.error: ServerError | None = None
        self.waiters = 0
        self.processed: Cursor | None = cursor
        self.acked: Cursor | None = None
        self.saved: Cursor | None = cursor
        self.unflushed = 0


@dataclass(slots=True)
class _Outcome:
    """How a session ended."""

    healthy: bool  # the server answered: the backoff may start again
    trouble: bool = False  # the server said it is in trouble (1011, 1013): keep backing off
    stop: ClientStopped | None = None


class _Session:
    """One WebSocket connection: its outbox and the frames in flight."""

    def __init__(self, number: int, ws: ClientConnection, tg: TaskGroup) -> None:
        self.id = number
        self.ws = ws
        self.tg = tg
        self.outbox: deque[str] = deque()
        self.queued = 0
        self.sent = 0
        self.wakeup = anyio.Event()
        self.progress = anyio.Event()
        self.healthy = False

    def send(self, frame: str) -> None:
        self.outbox.append(frame)
        self.queued += 1
        self.wakeup.set()


def _connector() -> Callable[..., Any]:
    """The ``connect`` of the websockets implementation for the running event loop: asyncio's or trio's.

    Raises ``ImportError`` under trio when the installed websockets has no trio
    implementation (it came with websockets 16).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio runs us on trio
        try:
            module = importlib.import_module("websockets.trio.client")
        except ImportError as exc:
            raise ImportError(
                f"ReplayClient under trio needs websockets >= 16, which has a trio implementation ({exc})"
            ) from None
    else:
        module = importlib.import_module("websockets.asyncio.client")
    connect: Callable[..., Any] = module.connect
    return connect


async def _abort(ws: Any) -> None:
    """Drop a dead connection's TCP stream at once, without the closing handshake."""
    transport = getattr(ws, "transport", None)  # websockets.asyncio
    if transport is not None:
        transport.abort()
        return
    stream = getattr(ws, "stream", None)  # websockets.trio
    if stream is not None:
        with anyio.CancelScope() as scope:
            scope.cancel()  # as trio.aclose_forcefully: close the stream without a graceful TLS or TCP goodbye
            await stream.aclose()


def _redacted(url: str) -> str:
    """``url`` fit for logs and messages: no query string or password (either may hold a token)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username is not None:
        netloc = f"{parts.username}:***@{netloc}" if parts.password is not None else f"{parts.username}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?..." if parts.query else "")


class ReplayClient:
    """A resilient subscriber to a starlette_replay route (protocol ``replay.v1``).

    Use it as ``async with ReplayClient(url, topics=[...]) as client:`` and read
    events with ``async for item in client``: each item is an
    :class:`~starlette_replay.Event` (``topic, epoch, offset, event, data,
    time``) or a :class:`Reset`. One task should iterate; other tasks may call
    :meth:`subscribe`, :meth:`unsubscribe` and :meth:`ack`.

    Connection options: ``headers`` (extra handshake headers, e.g. a cookie or
    an ``Authorization``), ``subprotocols`` (offered after ``replay.v1``; an app
    may read a token there), ``origin`` (the ``Origin`` header),
    ``open_timeout``, ``close_timeout``, ``max_size`` (largest frame accepted
    from the server), ``max_frame_rate`` and ``frame_burst`` (the client's
    own pace, a token bucket kept under the server's default limit of 100
    frames/s with bursts of 200), ``connect_options`` (more keyword arguments for
    ``websockets.asyncio.client.connect``, e.g. ``ssl`` or ``compression``).

    Resilience: ``backoff`` (:class:`Backoff`), ``heartbeat_interval`` (the
    server's; the socket is declared dead after twice that without a frame),
    ``rng`` and ``sleep`` (injectable for tests).

    Delivery: ``rewind`` (events to replay on a fresh subscription),
    ``buffer_size`` (items received ahead of the application; when full the
    client stops reading and the server's own flow control applies),
    ``auto_ack``, ``acks``, ``ack_interval``, ``ack_every``, ``cursor_store``
    (see the module docstring), ``on_error`` (a callable that receives every
    :class:`ServerError`; see :meth:`subscribe` for what happens without it).
    """

    def __init__(
        self,
        url: str,
        topics: Iterable[str] | Mapping[str, Cursor | None] = (),
        *,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        subprotocols: Sequence[str] = (),
        origin: str | None = None,
        cursor_store: CursorStore | None = None,
        acks: bool = False,
        auto_ack: bool = True,
        ack_interval: float = 1.0,
        ack_every: int = 100,
        rewind: int = 0,
        backoff: Backoff | None = None,
        heartbeat_interval: float = 25.0,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        buffer_size: int = 1000,
        max_size: int | None = 2**24,
        max_frame_rate: float = 50.0,
        frame_burst: int = 100,
        on_error: Callable[[ServerError], object] | None = None,
        connect_options: Mapping[str, Any] | None = None,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        try:
            import websockets  # noqa: F401
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                "ReplayClient needs the websockets library: pip install 'starlette-replay[client]'"
            ) from None
        scheme = urlsplit(url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, not {url[:40]!r}")
        for name, number in (
            ("ack_interval", ack_interval),
            ("heartbeat_interval", heartbeat_interval),
            ("open_timeout", open_timeout),
            ("close_timeout", close_timeout),
            ("max_frame_rate", max_frame_rate),
        ):
            if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {number!r}")
        for name, count in (("ack_every", ack_every), ("buffer_size", buffer_size), ("frame_burst", frame_burst)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive integer, not {count!r}")
        _check_rewind(rewind)
        if cursor_store is not None and not isinstance(cursor_store, CursorStore):
            raise TypeError(f"cursor_store must have async load() and save(), got {type(cursor_store).__name__}")
        initial: dict[str, Cursor | None] = {}
        if isinstance(topics, Mapping):
            for topic, cursor in topics.items():
                initial[check_topic(topic)] = _check_cursor(cursor)
        elif isinstance(topics, str):
            raise TypeError("topics must be a list of topics, not a string")
        else:
            for topic in topics:
                initial[check_topic(topic)] = None
        self.url = url
        self.headers = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        self.subprotocols = [SUBPROTOCOL, *(p for p in subprotocols if p != SUBPROTOCOL)]
        self.origin = origin
        self.cursor_store = cursor_store
        self.acks = acks
        self.auto_ack = auto_ack
        self.ack_interval = float(ack_interval)
        self.ack_every = ack_every
        self.rewind = rewind
        self.backoff = backoff if backoff is not None else Backoff()
        self.heartbeat_interval = float(heartbeat_interval)
        self.open_timeout = float(open_timeout)
        self.close_timeout = float(close_timeout)
        self.buffer_size = buffer_size
        self.max_size = max_size
        self.max_frame_rate = float(max_frame_rate)
        self.frame_burst = frame_burst
        self.on_error = on_error
        self.connect_options = dict(connect_options or {})
        self._rng = rng
        self._sleep = sleep
        self._initial = initial

        # The rules (no I/O); this object does the I/O around them.
        self._core = ClientCore(self.backoff, rng)
        self._topics: dict[str, _Topic] = self._core.topics  # type: ignore[assignment]
        self._orphans: dict[str, Cursor] = {}  # processed cursors of topics left, still to save
        # items for the application: (topic state or None, item or error to raise)
        self._buffer: deque[tuple[_Topic | None, Item | ReplayClientError]] = deque()
        self._items = 0
        self._ready = anyio.Event()
        self._space = anyio.Event()
        self._last: tuple[_Topic, Item] | None = None  # handed out, not yet processed
        self._session: _Session | None = None
        self._sessions = 0
        self._dirty = anyio.Event()
        self._urgent = anyio.Event()
        self._save_lock = anyio.Lock()
        self._stack: AsyncExitStack | None = None
        # Made by __aenter__: a cancel scope cannot be made outside an event loop, and the
        # websockets implementation depends on the loop (asyncio or trio).
        self._connect: Callable[..., Any]
        self._scope: anyio.CancelScope
        self._flusher_scope: anyio.CancelScope
        self._done = anyio.Event()
        self._started = False
        self._closed = False
        self._stopped: ClientStopped | None = None
        self.connections = 0  # handshakes that succeeded, for metrics and tests

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._session else "disconnected"
        return f"ReplayClient({_redacted(self.url)!r}, {state}, topics={sorted(self._topics)})"

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ReplayClient:
        """Start connecting in the background and return at once.

        Loads the cursors of the constructor's topics from ``cursor_store``
        first (its errors propagate). Raises :class:`ClientClosed` when entered
        twice. Safe to cancel: nothing is started until the cursors are loaded.
        """
        if self._started:
            raise ClientClosed("a ReplayClient can be entered only once")
        self._connect = _connector()
        for topic, cursor in self._initial.items():
            if cursor is None and self.cursor_store is not None:
                cursor = await self.cursor_store.load(topic)
            self._topics[topic] = _Topic(topic, cursor, self.rewind)
        self._started = True
        self._scope = anyio.CancelScope()
        self._flusher_scope = anyio.CancelScope()
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(self._main)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block normally means the last item handed out was handled.
        if exc_type is None and self.auto_ack:
            self._ack_last()
        try:
            await self.aclose()
        finally:
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.aclose()

    async def aclose(self) -> None:
        """Flush processed cursors (acks and ``cursor_store``), close the socket with 1000, stop.

        Takes at most about twice ``close_timeout`` (the flush, then the close
        handshake). Safe to call twice and from any task; items not yet read
        are dropped and the iterator ends. Shielded from cancellation, so that
        the socket is closed.
        """
        if not self._started:
            self._closed = True
            return
        with anyio.CancelScope(shield=True):
            if self._closed:
                await self._done.wait()
                return
            self._closed = True
            self._notify_all()
            self._flusher_scope.cancel()
            with anyio.move_on_after(self.close_timeout):
                await self._flush()
                session = self._session
                if session is not None:
                    await self._drained(session, session.queued)
            self._scope.cancel()
            await self._done.wait()

    async def _main(self) -> None:
        """The background work: the connection loop and the flusher, until ``aclose`` cancels them."""
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._flusher)
                    await self._run()
        except Exception:  # a bug: never let it cancel the application's `async with` body
            logger.exception("the client's background work failed")
            self._stop(ClientStopped("the client failed; see the log"))
        finally:
            self._done.set()

    # --- subscriptions ---------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        *,
        cursor: Cursor | None = None,
        rewind: int | None = None,
        wait: bool = True,
    ) -> None:
        """Subscribe to ``topic``, from ``cursor`` if given (resume after its offset).

        Without a cursor, the ``cursor_store``'s is used; without either the
        server resumes from the identity's stored cursor if it has one, else
        starts at the head (replaying the last ``rewind`` events, default the
        client's ``rewind``). Subscribing again to a topic the client holds
        with a cursor replaces the subscription (items of the topic not yet
        read are dropped); without a cursor it only waits.

        With ``wait`` (the default) returns once the server confirmed the
        subscription, across reconnects if need be (wrap it in
        ``anyio.fail_after`` to bound it); raises the server's refusal
        (:class:`ForbiddenError`, :class:`TooManySubscriptionsError`,
        :class:`BadRequestError`), :class:`ClientStopped` if the client stops,
        :class:`ClientClosed` if it is closed. ``unavailable``, ``rate_limited``
        and ``internal`` refusals are retried with backoff meanwhile. Without
        ``wait``, a refusal (also one of a subscription sent again after a
        reconnect) goes to ``on_error`` if set, else the iterator raises it.
        Raises ``InvalidTopic`` for a topic the protocol refuses. Safe to
        cancel: the subscription stays.
        """
        check_topic(topic)
        cursor = _check_cursor(cursor)
        rewind = self.rewind if rewind is None else _check_rewind(rewind)
        self._check_usable()
        state = self._topics.get(topic)
        if state is None or cursor is not None:
            if cursor is None and self.cursor_store is not None:
                cursor = await self.cursor_store.load(topic)
                self._check_usable()
                state = self._topics.get(topic)
            if state is None or cursor is not None:
                state = self._replace(topic, cursor, rewind)
        if wait:
            await self._wait_confirmed(state)

    async def unsubscribe(self, topic: str) -> None:
        """Leave ``topic``: its items not yet read are dropped, its processed cursor is saved at the next flush.

        With ``acks``, the processed cursor is acked first. Does nothing for a
        topic the client does not hold. Does not wait for the server's reply.
        Safe to cancel.
        """
        state = self._topics.pop(topic, None)
        if state is None:
            return
        self._purge(state)
        if self.cursor_store is not None and state.processed is not None and state.processed != state.saved:
            self._orphans[topic] = state.processed
            self._dirty.set()
        state.confirmed.set()
        session = self._session
        if session is not None:
            cursor = state.processed
            if self.acks and state.live and cursor is not None and cursor != state.acked:
                # The last word on this topic: the server stores where we stopped.
                session.send(
                    encode_client_frame(Ack(topic, cursor.epoch, cursor.offset, self._core.ref("a"), cursor.time))
                )
            session.send(encode_client_frame(Unsubscribe(topic, ref=self._core.ref("u"))))

    def ack(self, item: Item) -> None:
        """Mark ``item`` (and everything before it in its topic) as processed.

        Needed only with ``auto_ack=False``. The processed cursor is acked to
        the server and saved to the ``cursor_store`` at the next flush.
        Non-blocking; items of a topic the client left are ignored.
        """
        state = self._topics.get(item.topic)
        if state is not None:
            self._processed(state, item)

    def cursor(self, topic: str) -> Cursor | None:
        """The processed cursor of ``topic`` (what is acked and saved), or None."""
        state = self._topics.get(topic)
        return state.processed if state is not None else None

    @property
    def topics(self) -> list[str]:
        """The topics the client holds (confirmed or not)."""
        return list(self._topics)

    @property
    def connected(self) -> bool:
        """True while a WebSocket is open."""
        return self._session is not None

    # --- iteration -------------------------------------------------------------------

    def __aiter__(self) -> ReplayClient:
        return self

    async def __anext__(self) -> Item:
        """The next :class:`~starlette_replay.Event` or :class:`Reset`.

        With ``auto_ack``, calling it marks the previous item as processed.
        Raises :class:`ClientStopped` once the client stopped for good (after
        the items received before), a :class:`ServerError` for a refusal that
        went neither to a waiting :meth:`subscribe` nor to ``on_error`` (the
        iteration may go on after it), and ends when the client is closed.
        Safe to cancel: no item is lost.
        """
        if not self._started:
            raise ClientClosed("enter the client with `async with` before iterating over it")
        if self.auto_ack:
            self._ack_last()
        # A checkpoint even when items are waiting: the connection and the flusher get their turn.
        await anyio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._buffer:
                state, item = self._buffer.popleft()
                if isinstance(item, ReplayClientError):
                    raise item
                self._items -= 1
                self._space.set()
                if state is not None:
                    self._last = (state, item)
                return item
            if self._stopped is not None:
                raise self._stopped
            self._ready = anyio.Event()
            await self._ready.wait()

    # --- internals: the application side -------------------------------------------------

    def _check_usable(self) -> None:
        if not self._started or self._closed:
            raise ClientClosed("the client is not running: use it inside `async with ReplayClient(...)`")
        if self._stopped is not None:
            raise self._stopped

    def _replace(self, topic: str, cursor: Cursor | None, rewind: int) -> _Topic:
        old = self._topics.get(topic)
        state = _Topic(topic, cursor, rewind)
        if old is not None:
            self._purge(old)
            old.confirmed.set()
            if cursor is None:
                state.processed = old.processed
            state.saved = old.saved
            state.acked = old.acked
        self._topics[topic] = state
        if self._session is not None:
            self._send_subscribe(self._session, state)
        return state

    async def _wait_confirmed(self, state: _Topic) -> None:
        state.waiters += 1
        try:
            await state.confirmed.wait()
        finally:
            state.waiters -= 1
        if state.error is not None:
            raise state.error
        if self._stopped is not None:
            raise self._stopped
        if self._closed:
            raise ClientClosed("the client was closed")

    def _purge(self, state: _Topic) -> None:
        kept = deque(entry for entry in self._buffer if entry[0] is not state)
        self._items -= len(self._buffer) - len(kept)
        self._buffer = kept
        self._space.set()
        if self._last is not None and self._last[0] is state:
            self._last = None

    def _ack_last(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            self._processed(*last)

    def _processed(self, state: _Topic, item: Item) -> None:
        if self._topics.get(state.name) is not state:
            return
        cursor = item.cursor if isinstance(item, Reset) else Cursor(item.epoch, item.offset, item.time)
        current = state.processed
        if current is not None and current.epoch == cursor.epoch and current.offset >= cursor.offset:
            return
        state.processed = cursor
        state.unflushed += 1
        self._dirty.set()
        if state.unflushed >= self.ack_every:
            self._urgent.set()

    def _notify_all(self) -> None:
        """Wake the iterator and every waiting subscribe (the client stopped or closed)."""
        self._ready.set()
        self._space.set()
        for state in self._topics.values():
            state.confirmed.set()

    def _push_error(self, error: ReplayClientError) -> None:
        self._buffer.append((None, error))
        self._ready.set()

    async def _room(self) -> None:
        """Wait until the buffer has room for an item (each server frame makes at most one)."""
        while self._items >= self.buffer_size and not self._closed:
            self._space = anyio.Event()
            await self._space.wait()

    def _enqueue(self, state: _Topic, item: Item) -> None:
        self._buffer.append((state, item))
        self._items += 1
        self._ready.set()

    # --- internals: flushing cursors ---------------------------------------------------

    async def _flusher(self) -> None:
        with self._flusher_scope:
            await self._flush_periodically()

    async def _flush_periodically(self) -> None:
        last = -math.inf
        while True:
            await self._dirty.wait()
            remaining = last + self.ack_interval - anyio.current_time()
            if remaining > 0:
                with anyio.move_on_after(remaining):
                    await self._urgent.wait()
            self._dirty = anyio.Event()
            self._urgent = anyio.Event()
            last = anyio.current_time()
            await self._flush()

    async def _flush(self) -> None:
        """Ack processed cursors on the live connection and save them to the cursor store."""
        session = self._session
        to_save = dict(self._orphans)
        self._orphans.clear()
        for state in self._topics.values():
            cursor = state.processed
            state.unflushed = 0
            if cursor is None:
                continue
            if self.acks and session is not None and state.live and cursor != state.acked:
                frame = Ack(state.name, cursor.epoch, cursor.offset, self._core.ref("a"), cursor.time)
                session.send(encode_client_frame(frame))
                state.acked = cursor
            if self.cursor_store is not None and cursor != state.saved:
                to_save[state.name] = cursor
        if not to_save or self.cursor_store is None:
            return
        try:
            # One save at a time: aclose() flushes while the flusher may still be saving.
            async with self._save_lock:
                await self.cursor_store.save(to_save)
        except Exception:
            logger.exception("cursor_store.save failed; retrying at the next flush")
            for topic, cursor in to_save.items():
                if topic not in self._topics:
                    self._orphans.setdefault(topic, cursor)
            self._dirty.set()
            return
        for topic, cursor in to_save.items():
            saved = self._topics.get(topic)
            if saved is not None:
                saved.saved = cursor

    # --- internals: the connection ------------------------------------------------------

    async def _run(self) -> None:
        while True:
            outcome = await self._connect_once()
            if outcome.stop is not None:
                self._stop(outcome.stop)
                return
            delay = self._core.reconnect_delay(healthy=outcome.healthy, trouble=outcome.trouble)
            logger.info("[client#%d] reconnecting in %.2fs (attempt %d)", self._sessions, delay, self._core.attempt)
            await self._sleep(delay)

    def _stop(self, error: ClientStopped) -> None:
        logger.warning("[client#%d] stopped: %s", self._sessions, error)
        self._stopped = error
        self._notify_all()

    async def _connect_once(self) -> _Outcome:
        from websockets.exceptions import InvalidProxy, InvalidStatus, InvalidURI, WebSocketException
        from websockets.typing import Origin, Subprotocol

        number = self._sessions = self._sessions + 1
        options: dict[str, Any] = {
            "additional_headers": self.headers or None,
            "subprotocols": [Subprotocol(p) for p in self.subprotocols],
            "origin": Origin(self.origin) if self.origin is not None else None,
            "open_timeout": self.open_timeout,
            "close_timeout": self.close_timeout,
            "max_size": self.max_size,
            # The protocol's heartbeat (server pings, silence timeout) detects dead sockets.
            "ping_interval": None,
        }
        options.update(self.connect_options)
        # Both implementations of websockets are async context managers (asyncio's can also be
        # awaited; trio's can only be entered, as it opens a nursery in the caller's task).
        opened = False
        outcome: _Outcome | None = None
        try:
            async with self._connect(self.url, **options) as ws:
                opened = True
                outcome = await self._serve(number, ws)
        except InvalidStatus as exc:
            if opened:
                raise
            status = exc.response.status_code
            if not status_retryable(status):
                body = exc.response.body.decode("utf-8", "replace")[:200] if exc.response.body else ""
                return _Outcome(healthy=False, stop=HandshakeRejected(status, body))
            logger.info("[client#%d] handshake failed with HTTP %d", number, status)
            return _Outcome(healthy=False)
        except (InvalidURI, InvalidProxy) as exc:
            if opened:
                raise
            # Not the exception's text: it may quote the URL, token and all.
            message = f"cannot connect to {_redacted(self.url)!r}: {type(exc).__name__}"
            return _Outcome(healthy=False, stop=ClientStopped(message))
        except (OSError, TimeoutError, WebSocketException) as exc:
            if not opened:
                logger.info("[client#%d] cannot connect: %r", number, exc)
                return _Outcome(healthy=False)
            if outcome is None:
                raise
            logger.info("[client#%d] closing the socket failed: %r", number, exc)
        assert outcome is not None
        return outcome

    async def _serve(self, number: int, ws: Any) -> _Outcome:
        """Run one open connection until it ends, then close it (shielded: the close frame goes out)."""
        if ws.subprotocol != SUBPROTOCOL:
            logger.warning("[client#%d] the server did not accept subprotocol %s", number, SUBPROTOCOL)
        self.connections += 1
        logger.info("[client#%d] connected to %s", number, _redacted(self.url))
        session: _Session | None = None
        try:
            async with anyio.create_task_group() as tg:
                session = self._session = _Session(number, ws, tg)
                for send in self._core.connected():
                    session.send(send.frame)
                tg.start_soon(self._writer, session)
                outcome = await self._reader(session)
                tg.cancel_scope.cancel()
            return outcome
        finally:
            self._session = None
            if session is not None:
                session.progress.set()  # wakes an aclose() waiting for frames this session will never send
            self._core.disconnected()
            with anyio.CancelScope(shield=True):
                # asyncio's connection has close(), trio's aclose(); both are idempotent.
                await (ws.aclose() if hasattr(ws, "aclose") else ws.close())

    def _send_subscribe(self, session: _Session, state: _Topic) -> None:
        session.send(self._core.subscribe(state).frame)

    async def _writer(self, session: _Session) -> None:
        from websockets.exceptions import ConnectionClosed

        # Pace our own frames below the server's rate limit, so that a burst (a
        # hundred subscribes after a reconnect) is never dropped or closed with 1008.
        pacer = Pacer(self.max_frame_rate, self.frame_burst, anyio.current_time())
        while True:
            while not session.outbox:
                session.wakeup = anyio.Event()
                await session.wakeup.wait()
            wait = pacer.take(anyio.current_time())
            if wait > 0:
                await anyio.sleep(wait)
                continue
            frame = session.outbox.popleft()
            try:
                await session.ws.send(frame)
            except ConnectionClosed:
                return  # the reader sees the close
            session.sent += 1
            session.progress.set()

    async def _drained(self, session: _Session, seq: int) -> None:
        """Wait until the writer has sent the ``seq``-th frame of ``session`` (or the session ended)."""
        while session.sent < seq and self._session is session:
            session.progress = anyio.Event()
            await session.progress.wait()

    async def _reader(self, session: _Session) -> _Outcome:
        from websockets.exceptions import ConnectionClosed

        silence = 2 * self.heartbeat_interval
        while True:
            with anyio.move_on_after(silence) as scope:
                try:
                    message = await session.ws.recv()
                except ConnectionClosed as exc:
                    rcvd, sent = exc.rcvd, exc.sent
                    if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG and not exc.rcvd_then_sent:
                        # Replaying that event again would fail again.
                        error = f"the server sent a frame larger than max_size={self.max_size} bytes"
                        return _Outcome(healthy=session.healthy, stop=ClientStopped(error))
                    return self._close_outcome(session, rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
            if scope.cancelled_caught:
                logger.warning("[client#%d] no frame for %.1fs: the socket is dead, reconnecting", session.id, silence)
                await _abort(session.ws)
                return _Outcome(healthy=session.healthy)
            session.healthy = True
            if isinstance(message, bytes):
                logger.warning("[client#%d] ignoring a binary frame", session.id)
                continue
            try:
                frame = parse_server_frame(message)
            except ValueError as exc:
                logger.warning("[client#%d] ignoring a frame that is not a protocol frame: %s", session.id, exc)
                continue
            await self._room()
            self._apply(session, self._core.receive(frame))

    def _close_outcome(self, session: _Session, code: int | None, reason: str) -> _Outcome:
        if code is None:
            logger.info("[client#%d] connection lost (no close frame, 1006)", session.id)
            return _Outcome(healthy=session.healthy)
        stop = close_stop(code, reason)
        if stop is not None:
            return _Outcome(healthy=session.healthy, stop=stop)
        logger.info("[client#%d] server closed with %d %s", session.id, code, reason)
        return _Outcome(healthy=session.healthy, trouble=code in TROUBLE_CLOSE)

    def _apply(self, session: _Session, actions: list[Action]) -> None:
        """Carry out what the rules decided for one frame (synchronously: the buffer had room)."""
        for action in actions:
            if isinstance(action, Send):
                session.send(action.frame)
            elif isinstance(action, Deliver):
                self._enqueue(action.state, action.event)  # type: ignore[arg-type]
            elif isinstance(action, Confirmed):
                self._confirmed(session, action)
            elif isinstance(action, ErrorReceived):
                if self.on_error is not None:
                    try:
                        self.on_error(action.error)
                    except Exception:
                        logger.exception("on_error raised")
            elif isinstance(action, AckRefused):
                # The ack was not stored: ack again at the next flush.
                logger.info("[client#%d] ack refused: %s", session.id, action.error)
                if isinstance(action.state, _Topic):
                    action.state.acked = None
                    self._dirty.set()
            elif isinstance(action, RetrySubscribe):
                name, delay = action.state.name, action.delay
                logger.warning("[client#%d] subscribe of %r refused; retrying in %.2fs", session.id, name, delay)
                session.tg.start_soon(self._resubscribe_later, session, action.state, action.delay)
            elif isinstance(action, Refused):
                self._refused(session, action)
            elif isinstance(action, Unmatched):
                logger.warning("[client#%d] server error: %s", session.id, action.error)
                if self.on_error is None and action.push:
                    self._push_error(action.error)

    def _confirmed(self, session: _Session, action: Confirmed) -> None:
        state = action.state
        assert isinstance(state, _Topic)
        if action.reset is not None:
            logger.warning(
                "[client#%d] %r could not be resumed from %s: events may be lost (new epoch %s, %d replayed)",
                session.id,
                state.name,
                action.previous,
                action.reset.epoch,
                action.reset.replayed,
            )
            self._enqueue(state, action.reset)
        elif state.processed is None:
            # A fresh start: everything before it counts as handled, so a restart resumes here.
            state.processed = action.start
            self._dirty.set()
        if self.acks and state.processed is not None and state.processed != state.acked:
            self._dirty.set()
        state.confirmed.set()

    def _refused(self, session: _Session, action: Refused) -> None:
        state, error = action.state, action.error
        assert isinstance(state, _Topic)
        logger.error("[client#%d] subscribe refused: %s", session.id, error)
        state.error = error
        state.confirmed.set()
        if not state.waiters and self.on_error is None:
            self._push_error(error)

    async def _resubscribe_later(self, session: _Session, state: TopicState, delay: float) -> None:
        await self._sleep(delay)
        if self._session is session:
            for send in self._core.retry(state):
                session.send(send.frame)


def _check_rewind(rewind: object) -> int:
    if isinstance(rewind, int) and is_offset(rewind):
        return rewind
    raise ValueError(f"rewind must be a non-negative integer, not {rewind!r}")


def _check_cursor(cursor: object) -> Cursor | None:
    if cursor is None:
        return None
    if not isinstance(cursor, Cursor):
        raise TypeError(f"cursor must be a starlette_replay.Cursor or None, not {type(cursor).__name__}")
    if not isinstance(cursor.epoch, str) or not cursor.epoch or not is_offset(cursor.offset):
        raise ValueError(f"invalid cursor {cursor!r}: a non-empty epoch and an offset from 0 to 2**53-1")
    return cursor
