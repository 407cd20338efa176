"""The stored event, as publishers get it back and subscribers receive it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["Event"]

_UNSET: Any = object()


class Event:
    """One stored event.

    ``offset`` is dense within ``(topic, epoch)``: 1, 2, 3, ... ``data`` is the JSON
    payload; the store keeps it as JSON text (``raw``) so that a frame can embed it
    without encoding it again. ``time`` is the store's clock, in ms since the Unix
    epoch.
    """

    __slots__ = ("_data", "_frame", "epoch", "event", "offset", "raw", "time", "topic")

    topic: str
    epoch: str
    offset: int
    event: str
    raw: str
    time: int

    def __init__(
        self,
        topic: str,
        epoch: str,
        offset: int,
        event: str,
        raw: str,
        time: int,
        data: Any = _UNSET,
    ) -> None:
        self.topic = topic
        self.epoch = epoch
        self.offset = offset
        self.event = event
        self.raw = raw
        self.time = time
        self._data = data
        self._frame: str | None = None

    @property
    def data(self) -> Any:
        """The payload, decoded from ``raw`` on first use."""
        if self._data is _UNSET:
            self._data = json.loads(self.raw)
        return self._data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.topic, self.epoch, self.offset, self.event, self.raw, self.time) == (
            other.topic,
            other.epoch,
            other.offset,
            other.event,
            other.raw,
            other.time,
        )

    def __hash__(self) -> int:
        return hash((self.topic, self.epoch, self.offset))

    def __repr__(self) -> str:
        return (
            f"Event(topic={self.topic!r}, epoch={self.epoch!r}, offset={self.offset}, "
            f"event={self.event!r}, data={self.raw[:80]!r}, time={self.time})"
        )
