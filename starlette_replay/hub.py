"""Fan-out: from the store's live events to every local subscription.

The hub is the store's :class:`~starlette_replay.stores.LiveSink`. It keeps one
entry per topic that has subscribers in this process, asks the store to deliver
that topic exactly once (however many subscribers), and hands each event's
frame, encoded once, to every subscription.

A :class:`Subscription` makes the replay -> live hand-off gap-free:

1. it is registered here *before* the store subscription is confirmed and the
   head is read, and buffers every live event it is offered (``pending``);
2. the connection replays history up to the head it read;
3. :meth:`Subscription.go_live` merges the buffer by offset (dropping what the
   replay already sent, refusing any hole) and from then on forwards live events
   straight to the connection's queue.

Any hole or epoch change it sees is a promise it cannot keep: it closes the
connection with 1013 and the client resumes from its cursor.

The hub calls connections only through :class:`Recipient`, as stores call the
hub only through ``LiveSink``: it never imports the connection module above it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import anyio

from .events import Event
from .metrics import Metrics
from .protocol import CloseCode, encode_event
from .stores.base import EventStore

__all__ = ["Hub", "Recipient", "Subscription"]

logger = logging.getLogger("starlette_replay.hub")

_UNSUBSCRIBE_TIMEOUT = 5.0


class Recipient(Protocol):
    """What the hub needs of a connection (``Connection`` implements it). Every call is synchronous."""

    @property
    def id(self) -> str:
        """The connection's id, for log records."""
        ...

    @property
    def close_code(self) -> int | None:
        """The code it is closing with, or None while it is open."""
        ...

    def count_live(self, n: int) -> None:
        """``n`` live events held for it (negative: released); past its bound it closes with 1013."""

    def push_live(self, frame: str, event: Event) -> None:
        """Send or queue one live event's frame (the event too: an SSE stream writes its position); never waits."""

    def abort(self, code: int, reason: str) -> None:
        """Close with ``code`` as soon as possible; idempotent."""


class Subscription:
    """One connection's subscription to one topic."""

    __slots__ = ("connection", "epoch", "last", "live", "pending", "topic")

    def __init__(self, connection: Recipient, topic: str) -> None:
        self.connection = connection
        self.topic = topic
        self.epoch: str | None = None
        self.last = 0  # offset of the last event queued for the client
        self.live = False
        self.pending: list[tuple[Event, str]] = []

    def offer(self, event: Event, frame: str) -> None:
        """Take one live event (called by the hub, synchronously, in offset order)."""
        if not self.live:
            self.pending.append((event, frame))
            self.connection.count_live(1)
            return
        if event.epoch == self.epoch:
            if event.offset <= self.last:
                return
            if event.offset == self.last + 1:
                self.last = event.offset
                self.connection.push_live(frame, event)
                return
        self._broken(event)

    def go_live(self, epoch: str, last: int) -> None:
        """Switch to live after the replay queued every event up to ``last``.

        Buffered events at or below ``last`` are dropped, the rest must follow
        on without a hole.
        """
        self.epoch = epoch
        self.last = last
        pending, self.pending = self.pending, []
        self.connection.count_live(-len(pending))
        self.live = True
        for event, frame in pending:
            self.offer(event, frame)

    def _broken(self, event: Event) -> None:
        if self.connection.close_code is not None:
            return  # already closing: the events that follow would only repeat the warning
        if event.epoch != self.epoch:
            reason = "topic epoch changed"
        else:
            reason = "gap in live events"
        logger.warning(
            "[%s] %s on %r (at offset %d, got %s/%d); closing so the client resumes",
            self.connection.id,
            reason,
            self.topic,
            self.last,
            event.epoch,
            event.offset,
        )
        self.connection.abort(CloseCode.TRY_AGAIN_LATER, reason)

    def __repr__(self) -> str:
        return f"Subscription({self.connection.id}, {self.topic!r}, live={self.live}, last={self.last})"


class _Topic:
    __slots__ = ("listening", "lock", "subs")

    def __init__(self) -> None:
        self.subs: set[Subscription] = set()
        self.listening = False
        self.lock = anyio.Lock()


class Hub:
    """Routes a store's live events to local subscriptions."""

    def __init__(self, store: EventStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()  # the connections count here too
        self._topics: dict[str, _Topic] = {}
        # Set by a connection whose live queue is half full: the publisher then
        # yields once before its next append so that the writers can drain.
        self.backlogged = False
        # Event-loop turns in which a connection sent inline: a connection sends
        # only a few frames inline per turn (see Connection._send_inline).
        self.turn = 0
        self.turn_ending = False

    def used_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a new turn once the tasks and callbacks ready now have run."""
        if not self.turn_ending:
            self.turn_ending = True
            loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.turn_ending = False
        self.turn += 1

    # --- LiveSink ----------------------------------------------------------------

    def deliver(self, event: Event) -> None:
        entry = self._topics.get(event.topic)
        if entry is None or not entry.subs:
            return
        self.metrics.live_event(event.time)
        frame = encode_event(event)
        for sub in entry.subs:
            sub.offer(event, frame)

    def reset(self, topic: str, reason: str) -> None:
        entry = self._topics.get(topic)
        if entry is None:
            return
        logger.warning(
            "live events of %r cannot be vouched for (%s): closing %d subscribers", topic, reason, len(entry.subs)
        )
        for sub in list(entry.subs):
            sub.connection.abort(CloseCode.TRY_AGAIN_LATER, reason)

    # --- membership ----------------------------------------------------------------

    async def join(self, sub: Subscription) -> None:
        """Register ``sub`` and return once the store delivers its topic live.

        Raises what ``store.subscribe`` raises (``StoreUnavailable``), with ``sub``
        unregistered again. Cancelling is safe: ``sub`` is then unregistered.
        """
        entry = self._topics.get(sub.topic)
        if entry is None:
            entry = self._topics[sub.topic] = _Topic()
        entry.subs.add(sub)
        if entry.listening:
            return
        try:
            async with entry.lock:
                if not entry.listening:
                    await self.store.subscribe(sub.topic)
                    entry.listening = True
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.leave(sub)
            raise

    async def leave(self, sub: Subscription) -> None:
        """Unregister ``sub``; stop the store's delivery when it was the topic's last."""
        entry = self._topics.get(sub.topic)
        if entry is None:
            return
        entry.subs.discard(sub)
        if entry.subs:
            return
        async with entry.lock:
            if entry.subs:
                return
            if entry.listening:
                entry.listening = False
                # Bounded: this runs in shielded connection clean-up. An event that
                # still arrives for the topic finds no entry and is ignored.
                with anyio.move_on_after(_UNSUBSCRIBE_TIMEOUT) as scope:
                    try:
                        await self.store.unsubscribe(sub.topic)
                    except Exception:
                        logger.exception("store failed to unsubscribe %r", sub.topic)
                if scope.cancelled_caught:
                    logger.warning("store did not unsubscribe %r within %ss", sub.topic, _UNSUBSCRIBE_TIMEOUT)
            if not entry.subs and self._topics.get(sub.topic) is entry:
                del self._topics[sub.topic]

    # --- figures -----------------------------------------------------------------

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    @property
    def subscription_count(self) -> int:
        return sum(len(entry.subs) for entry in self._topics.values())
