"""Publishing: validate, store first, and let the store's live side deliver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import anyio.from_thread
import anyio.lowlevel

from .errors import InvalidEvent, NotRunning, StoreError, StoreUnavailable
from .events import Event
from .hub import Hub
from .metrics import Metrics
from .protocol import check_event_type, check_topic, encode_data
from .stores.base import EventStore

__all__ = ["Publisher", "RunningLoop"]

# bytes an event frame adds to its data: the type, topic, offset and time fields
_FRAME_OVERHEAD = 96


class RunningLoop:
    """Where a running Replay runs: set by the Replay when it starts, cleared when it stops."""

    __slots__ = ("thread", "token")

    def __init__(self) -> None:
        self.token: anyio.lowlevel.EventLoopToken | None = None  # None: not running
        self.thread: int | None = None


class Publisher:
    """Publishes events through a :class:`~starlette_replay.Replay`.

    In FastAPI, ``publisher: Publisher = Depends(replay.publisher)``; elsewhere
    ``replay.publish`` is the same call. Made by the Replay with what it works
    with: the store it appends to, the hub whose backlog it yields to, and the
    Replay's running loop.
    """

    __slots__ = ("_hub", "_loop", "_max_event_size", "_metrics", "_store")

    def __init__(self, store: EventStore, hub: Hub, loop: RunningLoop, *, max_event_size: int) -> None:
        self._store = store
        self._hub = hub
        self._loop = loop
        self._max_event_size = max_event_size
        self._metrics: Metrics = hub.metrics

    def _encode(self, topic: str, event_type: str, data: Any) -> str:
        raw = encode_data(data)
        size = (len(raw) if raw.isascii() else len(raw.encode("utf-8"))) + len(topic) + len(event_type)
        size += _FRAME_OVERHEAD
        limit = self._max_event_size
        if size > limit:
            raise InvalidEvent(f"encoded event is {size} bytes, over max_event_size={limit}")
        return raw

    async def publish(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event:
        """Store one event, then deliver it to the topic's subscribers.

        Returns the stored :class:`Event` (with its offset and epoch). Raises
        ``InvalidTopic``/``InvalidEvent`` before storing anything, ``NotRunning``
        when the Replay is not started, and ``StoreUnavailable`` when the store
        could not confirm the write (the event was then delivered to no one).
        With ``idempotency_key``, publishing again with the same key stores
        nothing and returns the first event. Cancelling is safe in that nothing
        is delivered that the store does not hold, but the event may or may not
        have been stored: retry with an ``idempotency_key`` to be sure.
        """
        events = await self.publish_many(topic, [(event_type, data)], idempotency_key=idempotency_key)
        return events[0]

    async def publish_many(
        self,
        topic: str,
        events: Iterable[tuple[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> list[Event]:
        """Store several events in one atomic append, with consecutive offsets.

        Same errors and cancellation as :meth:`publish`; an empty list stores
        nothing and returns ``[]``.
        """
        metrics = self._metrics
        try:
            check_topic(topic)
            items = [
                (check_event_type(event_type), self._encode(topic, event_type, data)) for event_type, data in events
            ]
            key = idempotency_key
            if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
                raise InvalidEvent("idempotency_key must be a string of 1-256 characters")
        except ValueError:  # InvalidTopic, InvalidEvent
            metrics.publishes_invalid += 1
            raise
        if not items:
            return []
        if self._loop.token is None:
            metrics.publishes_unavailable += 1
            raise NotRunning(
                "the Replay is not running: pass lifespan=replay.lifespan to the app, or use `async with replay:`"
            )
        hub = self._hub
        if hub.backlogged:
            # Some live queue is half full: let the writers drain it before adding
            # more, so that a burst of publishes does not close prompt readers with
            # 1013. Before the append: cancelling here stores nothing.
            hub.backlogged = False
            await anyio.lowlevel.checkpoint()
        start = time.perf_counter()
        try:
            stored = await self._store.append(topic, items, idempotency_key=idempotency_key)
        except StoreUnavailable:
            metrics.publishes_unavailable += 1
            raise
        except StoreError:
            metrics.publishes_error += 1
            raise
        metrics.published(len(stored), time.perf_counter() - start)
        return stored

    def publish_sync(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event:
        """:meth:`publish` from a thread: a FastAPI ``def`` handler, a worker thread.

        Blocks until the event is stored and returns it; raises like
        :meth:`publish`, and ``RuntimeError`` when called from the event loop's
        own thread (use ``await publish(...)`` there).
        """
        token, loop_thread = self._loop.token, self._loop.thread
        if token is None:
            raise NotRunning("the Replay is not running: start it before publishing")
        if threading.get_ident() == loop_thread:
            raise RuntimeError("publish_sync() was called from the event loop thread: use `await publish(...)`")
        return anyio.from_thread.run(
            lambda: self.publish(topic, event_type, data, idempotency_key=idempotency_key),
            token=token,
        )
