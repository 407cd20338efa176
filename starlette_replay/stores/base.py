"""The contract every event store implements (memory, Redis, and any later one).

A store keeps, per topic, an epoch and a dense sequence of events, and tells a
:class:`LiveSink` about every event appended to a topic that was subscribed.
The hub relies on exactly these promises:

* ``append`` is atomic: all of its events get consecutive offsets in one epoch,
  or none is stored.
* ``subscribe(topic)`` returns only once every event appended *after* it returned
  will reach ``sink.deliver``: a replay that reads the head afterwards cannot
  miss anything.
* ``sink.deliver`` sees a subscribed topic's events in increasing offset order
  with no holes within an epoch. A store that cannot keep that (it lost contact
  and cannot repair) calls ``sink.reset(topic, reason)`` instead.
* The epoch changes whenever the store may have lost the topic's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..events import Event

__all__ = ["Cursor", "EventStore", "Health", "HealthCheck", "LiveSink", "Position"]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a topic stands.

    ``head`` is the offset of the newest event (0 when none was ever published in
    this epoch); ``oldest`` the offset of the oldest retained event, or
    ``head + 1`` when nothing is retained.
    """

    epoch: str
    head: int
    oldest: int


@dataclass(frozen=True, slots=True)
class Cursor:
    """A client's position in a topic: the last offset it has, in an epoch.

    ``time`` is the store's ``time`` of the event at ``offset`` as the client got
    it, when known: a resume compares it with the stored event's to notice an
    offset that a store which lost events has reused (protocol "Reused offsets").
    """

    epoch: str
    offset: int
    time: int | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Whether something can serve now (``ready``), and each check's finding.

    ``checks`` maps a check's name to ``"ok"`` or to what is wrong, in words.
    """

    ready: bool
    checks: dict[str, str]


@runtime_checkable
class HealthCheck(Protocol):
    """A store that can tell whether it serves (optional: a store without it is taken as ready).

    ``health()`` must not block: it reports what the store's own background
    checks found (RedisStore probes itself through its pub/sub path).
    """

    def health(self) -> Health: ...


class LiveSink(Protocol):
    """What receives live events from a store (the hub). Both calls must not block."""

    def deliver(self, event: Event) -> None:
        """One newly appended event of a subscribed topic, in offset order."""

    def reset(self, topic: str, reason: str) -> None:
        """The store cannot vouch for the continuity of ``topic``'s live events."""


@runtime_checkable
class EventStore(Protocol):
    """An event log with live notification. See the module docstring for the promises."""

    def connect(self, sink: LiveSink) -> AbstractAsyncContextManager[None]:
        """Open the store and send live events to ``sink`` while the context is entered."""
        ...

    async def subscribe(self, topic: str) -> None:
        """Start live delivery of ``topic``; confirmed when this returns.

        Raises :class:`~starlette_replay.StoreUnavailable` when the store cannot be
        reached. The hub calls it once per topic, whatever the number of
        subscribers in this process.
        """
        ...

    async def unsubscribe(self, topic: str) -> None:
        """Stop live delivery of ``topic``. Never raises for a lost connection."""
        ...

    async def append(
        self,
        topic: str,
        items: Sequence[tuple[str, str]],
        *,
        idempotency_key: str | None = None,
    ) -> list[Event]:
        """Store ``(event_type, raw_json)`` items atomically with consecutive offsets.

        Returns the stored events. With an ``idempotency_key`` already used on
        this topic (while its events are retained), stores nothing and returns the
        events stored the first time. Raises ``StoreUnavailable`` when the store
        cannot confirm the write.
        """
        ...

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` retained events of the current epoch with offset > ``after``, in order."""
        ...

    async def position(self, topic: str) -> Position:
        """The topic's epoch, head and oldest retained offset.

        Makes the topic's epoch if the store does not hold the topic yet.
        """
        ...

    async def load_cursor(self, identity: str, topic: str) -> Cursor | None:
        """The cursor stored for ``identity`` on ``topic``, if any."""
        ...

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        """Store a cursor: within one epoch it only moves forward; another epoch replaces it."""
        ...

    async def aclose(self) -> None:
        """Release what the store owns. Safe to call twice."""
        ...
