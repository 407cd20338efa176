"""Errors raised by starlette_replay.

One root, :class:`ReplayError`. Validation errors also subclass :class:`ValueError`
so that code which already catches ``ValueError`` for bad input keeps working.
"""

from __future__ import annotations

__all__ = [
    "InvalidEvent",
    "InvalidTopic",
    "NotRunning",
    "Refused",
    "ReplayError",
    "StoreError",
    "StoreUnavailable",
]


class ReplayError(Exception):
    """Root of every error this library raises on purpose."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class InvalidTopic(ReplayError, ValueError):
    """A topic name the wire protocol would refuse (1-256 chars of ``A-Za-z0-9_-.:@/``)."""


class InvalidEvent(ReplayError, ValueError):
    """An event type, payload or encoded size that cannot be published.

    Raised before anything is stored.
    """


class NotRunning(ReplayError, RuntimeError):
    """The :class:`~starlette_replay.Replay` was used before it was started or after it closed."""


class StoreError(ReplayError):
    """The event store failed. Subclasses tell retryable failures from fatal ones."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (network, timeout, server down).

    Retrying later may succeed. For a publish this means the event was *not*
    acknowledged by the store; with an ``idempotency_key`` a retry is safe.
    """


class Refused(ReplayError):
    """Raised by an app's ``identify`` hook to refuse a WebSocket handshake (HTTP 403)."""

    def __init__(self, reason: str = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
