"""The embedded event store: one process, bounded, nothing on disk.

Restarting the process loses the history; the next epoch tells clients so.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import islice

from .._checks import check_int, check_seconds
from ..events import Event
from .base import Cursor, Health, LiveSink, Position

__all__ = ["MemoryStore"]


def new_epoch() -> str:
    """A random epoch: 64 bits from ``secrets``, as 16 hex characters."""
    return secrets.token_hex(8)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# A retained event: (event type, raw JSON, time, its frame once encoded, else None).
# Plain tuples of str and int, which the cyclic garbage collector stops tracking
# once it has seen them: a long history (10,000 events x 1,000 topics) costs no
# collector time. Retained Event objects were traced by every full collection.
_Stored = tuple[str, str, int, "str | None"]


class _Topic:
    __slots__ = ("epoch", "events", "head", "keys", "last_publish")

    def __init__(self, history_size: int) -> None:
        self.epoch = new_epoch()
        self.head = 0
        self.events: deque[_Stored] = deque(maxlen=history_size)  # offsets oldest() .. head
        # idempotency key -> the first and last offsets stored under it, oldest first
        self.keys: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.last_publish = time.monotonic()

    def oldest(self) -> int:
        return self.head - len(self.events) + 1

    def event(self, topic: str, offset: int) -> Event:
        """The retained event at ``offset`` (between ``oldest()`` and ``head``)."""
        event_type, raw, stamp, frame = self.events[offset - self.oldest()]
        event = Event(topic, self.epoch, offset, event_type, raw, stamp)
        event._frame = frame  # the frame cache Event keeps for protocol.encode_event
        return event


class MemoryStore:
    """Keeps each topic's last ``history_size`` events in this process's memory.

    ``history_ttl`` (seconds): a topic not published to for that long is
    forgotten. ``max_topics``: past it, the least recently published topic is
    forgotten (topics never published to, made by a subscribe, go first). A
    forgotten topic comes back in a new epoch. Topics with live
    subscribers in this process are never forgotten by either rule, so that an
    idle but watched topic keeps its epoch. ``max_cursors`` bounds the stored
    cursors (least recently written forgotten first).

    All methods run synchronously inside the event loop; they are safe to cancel.
    """

    def __init__(
        self,
        history_size: int = 10_000,
        history_ttl: float | None = None,
        max_topics: int = 100_000,
        max_cursors: int = 100_000,
    ) -> None:
        self.history_size = check_int("history_size", history_size)
        self.history_ttl = check_seconds("history_ttl", history_ttl, optional=True)
        self.max_topics = check_int("max_topics", max_topics)
        self.max_cursors = check_int("max_cursors", max_cursors)
        # least recently published first
        self._topics: OrderedDict[str, _Topic] = OrderedDict()
        # topics made by position() and never published: forgotten before any topic with
        # history, so that subscribing to unknown names cannot push real histories out
        self._unpublished: OrderedDict[str, None] = OrderedDict()
        self._live: set[str] = set()
        self._cursors: OrderedDict[tuple[str, str], Cursor] = OrderedDict()
        self._sink: LiveSink | None = None

    def __repr__(self) -> str:
        return (
            f"MemoryStore(history_size={self.history_size}, history_ttl={self.history_ttl}, "
            f"max_topics={self.max_topics})"
        )

    # --- lifecycle ---------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, sink: LiveSink) -> AsyncIterator[None]:
        if self._sink is not None:
            raise RuntimeError("this MemoryStore is already connected to a hub")
        self._sink = sink
        try:
            yield
        finally:
            self._sink = None
            self._live.clear()

    async def aclose(self) -> None:
        self._sink = None

    def health(self) -> Health:
        """Always ready: the store is this process's memory, it answers whenever the process does."""
        return Health(True, {"store": "ok (in memory)"})

    # --- live side ---------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        # Appends deliver synchronously, so delivery is in force the moment the
        # topic is in the set.
        self._live.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._live.discard(topic)

    # --- topics ------------------------------------------------------------------

    def _expired(self, entry: _Topic, now: float) -> bool:
        return self.history_ttl is not None and now - entry.last_publish >= self.history_ttl

    def _get(self, topic: str, create: bool) -> _Topic | None:
        entry = self._topics.get(topic)
        if entry is not None and topic not in self._live and self._expired(entry, time.monotonic()):
            self._forget(topic)
            entry = None
        if entry is None and create:
            entry = self._topics[topic] = _Topic(self.history_size)
            self._unpublished[topic] = None
            self._forget_extra(keep=topic)
        return entry

    def _forget(self, topic: str) -> None:
        del self._topics[topic]
        self._unpublished.pop(topic, None)

    def _forget_extra(self, keep: str) -> None:
        """Drop expired topics, then the least recently published ones past ``max_topics``.

        ``keep`` (the topic being created) is never dropped: when every other
        topic is live the store goes over ``max_topics`` rather than lose it.
        """
        now = time.monotonic()
        if self.history_ttl is not None:
            for name in list(islice(self._topics, 64)):
                entry = self._topics[name]
                if not self._expired(entry, now):
                    break
                if name not in self._live and name != keep:
                    self._forget(name)
        if len(self._topics) > self.max_topics:
            for name in list(islice(self._unpublished, 64)):
                if len(self._topics) <= self.max_topics:
                    break
                if name not in self._live and name != keep:
                    self._forget(name)
            for name in list(self._topics):
                if len(self._topics) <= self.max_topics:
                    break
                if name not in self._live and name != keep:
                    self._forget(name)

    # --- the log -----------------------------------------------------------------

    async def append(
        self,
        topic: str,
        items: Sequence[tuple[str, str]],
        *,
        idempotency_key: str | None = None,
    ) -> list[Event]:
        entry = self._get(topic, create=True)
        assert entry is not None
        if idempotency_key is not None:
            seen = entry.keys.get(idempotency_key)
            if seen is not None:  # retained: a key is dropped once its last event is trimmed
                return [entry.event(topic, offset) for offset in range(seen[0], seen[1] + 1)]
        stamp = now_ms()
        first = entry.head + 1
        events = [
            Event(topic, entry.epoch, first + i, event_type, raw, stamp) for i, (event_type, raw) in enumerate(items)
        ]
        if not events:
            return events
        entry.head += len(events)
        entry.last_publish = time.monotonic()
        self._topics.move_to_end(topic)
        self._unpublished.pop(topic, None)
        stored = entry.events
        stored.extend([(event.event, event.raw, stamp, None) for event in events])  # stored before delivered
        sink = self._sink
        if sink is not None and topic in self._live:
            for event in events:
                sink.deliver(event)
            # Keep the frames the hub encoded as they went out live, for replays (a
            # reconnect storm replays the same events to many clients: encoded once).
            end = len(stored)
            for i, event in enumerate(events, start=end - len(events)):
                if i >= 0 and event._frame is not None:
                    stored[i] = (event.event, event.raw, stamp, event._frame)
        if idempotency_key is not None:
            entry.keys[idempotency_key] = (first, entry.head)
            oldest = entry.oldest()
            while entry.keys:
                key, (_, last) = next(iter(entry.keys.items()))
                if last >= oldest:
                    break
                del entry.keys[key]
        return events

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        entry = self._get(topic, create=False)
        if entry is None or not entry.events or limit <= 0:
            return []
        oldest = entry.oldest()
        first = max(oldest, after + 1)
        epoch = entry.epoch
        events = []
        for offset, (event_type, raw, stamp, frame) in enumerate(
            islice(entry.events, first - oldest, first - oldest + limit), start=first
        ):
            event = Event(topic, epoch, offset, event_type, raw, stamp)
            event._frame = frame  # the frame cache Event keeps for protocol.encode_event
            events.append(event)
        return events

    async def position(self, topic: str) -> Position:
        entry = self._get(topic, create=True)
        assert entry is not None
        return Position(entry.epoch, entry.head, entry.oldest())

    # --- cursors -----------------------------------------------------------------

    async def load_cursor(self, identity: str, topic: str) -> Cursor | None:
        return self._cursors.get((identity, topic))

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        key = (identity, topic)
        old = self._cursors.get(key)
        if old is not None and old.epoch == cursor.epoch and old.offset >= cursor.offset:
            return
        self._cursors[key] = cursor
        self._cursors.move_to_end(key)
        while len(self._cursors) > self.max_cursors:
            self._cursors.popitem(last=False)
