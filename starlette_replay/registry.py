"""The open connections of one Replay: counted per identity, tracked while open, closed on demand.

The endpoint *reserves* a connection against its identity before ``accept()``
(with no await since the limit check: the limit has no race, and ``revoke``
reaches handshakes in progress), *tracks* it while it runs (stats, heartbeat,
shutdown), then *untracks* and *releases* it. ``revoke``, ``recheck`` and
``close_all`` close connections with a code and wait, bounded, until they are
closed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import HTTPConnection

from .connection import Connection
from .metrics import Metrics
from .protocol import CloseCode

__all__ = ["Registry"]

logger = logging.getLogger("starlette_replay.registry")


class Registry:
    """Every connection of one Replay from its handshake to its end.

    Plain methods, not context managers: a suspended generator per connection
    costs memory that every idle connection would carry (see docs/benchmarks.md).
    """

    __slots__ = (
        "_all_closed",
        "_close_waiters",
        "_per_identity",
        "accepting",
        "close_timeout",
        "connections",
        "max_per_identity",
        "metrics",
    )

    def __init__(self, *, max_per_identity: int | None, close_timeout: float, metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_per_identity = max_per_identity
        self.close_timeout = close_timeout
        self.connections: set[Connection] = set()  # accepted and running
        # False before start and once shutdown began: a connection tracked then is closed with 1001.
        self.accepting = False
        self._per_identity: dict[str, set[Connection]] = {}
        self._close_waiters: dict[Connection, anyio.Event] = {}
        self._all_closed: anyio.Event | None = None

    def identity_full(self, identity: str | None) -> bool:
        """True when ``identity`` already holds ``max_per_identity`` connections (handshakes included)."""
        limit = self.max_per_identity
        return identity is not None and limit is not None and len(self._per_identity.get(identity, ())) >= limit

    def reserve(self, connection: Connection) -> None:
        """Count ``connection`` against its identity from before ``accept()``; :meth:`release` ends it."""
        identity = connection.identity
        if identity is not None:
            self._per_identity.setdefault(identity, set()).add(connection)

    def release(self, connection: Connection) -> None:
        identity = connection.identity
        if identity is not None:
            held = self._per_identity.get(identity)
            if held is not None:
                held.discard(connection)
                if not held:
                    del self._per_identity[identity]
        waiter = self._close_waiters.pop(connection, None)
        if waiter is not None:
            waiter.set()

    def track(self, connection: Connection) -> None:
        """Count ``connection`` as open (stats, heartbeat, shutdown) until :meth:`untrack`."""
        self.connections.add(connection)
        self.metrics.connections_opened += 1
        if connection.transport == "sse":
            self.metrics.sse_streams_opened += 1
        if not self.accepting:
            # Accepted while shutdown ran (or after): the hub no longer gets live events.
            connection.abort(CloseCode.GOING_AWAY, "server shutting down")

    async def serve(self, connection: Connection) -> None:
        """Run ``connection`` (WebSocket or SSE stream), counted as open while it runs. Never raises
        but what cancels it."""
        self.track(connection)
        try:
            await connection.run()
        finally:
            self.untrack(connection)

    def untrack(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.metrics.closed(connection.close_code, connection.sent)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def close_all(self, code: int, reason: str) -> None:
        """Stop accepting, close every open connection with ``code``, wait at most ``close_timeout`` + 1 s.

        Never raises. Cancelling stops only the wait.
        """
        self.accepting = False
        if not self.connections:
            return
        logger.info("shutting down: closing %d connections", len(self.connections))
        self._all_closed = anyio.Event()
        for connection in list(self.connections):
            connection.abort(code, reason)
        with anyio.move_on_after(self.close_timeout + 1):
            await self._all_closed.wait()

    async def revoke(self, identity: str, reason: str) -> int:
        """See :meth:`Replay.revoke <starlette_replay.Replay.revoke>`."""
        targets = list(self._per_identity.get(identity, ()))
        if not targets:
            return 0
        logger.info("revoking %d connections of an identity: %s", len(targets), reason)
        waiters = [self._close_waiters.setdefault(connection, anyio.Event()) for connection in targets]
        for connection in targets:
            connection.abort(CloseCode.POLICY_VIOLATION, reason)
        await self._wait(waiters)
        return len(targets)

    async def recheck(self, check: Callable[[HTTPConnection, str | None], bool | Awaitable[bool]], reason: str) -> int:
        """See :meth:`Replay.recheck <starlette_replay.Replay.recheck>`."""
        failed: list[Connection] = []
        for connection in list(self.connections):
            try:
                result = check(connection.handshake, connection.identity)
                if inspect.isawaitable(result):
                    result = await result
                valid = result is True
            except Exception:
                logger.exception("[%s] recheck() raised; closing the connection", connection.id)
                valid = False
            if not valid and connection in self.connections:
                failed.append(connection)
                self._close_waiters.setdefault(connection, anyio.Event())
                connection.abort(CloseCode.POLICY_VIOLATION, reason)
        await self._wait([self._close_waiters[c] for c in failed if c in self._close_waiters])
        return len(failed)

    async def _wait(self, waiters: list[anyio.Event]) -> None:
        with anyio.move_on_after(self.close_timeout + 1):
            for waiter in waiters:
                await waiter.wait()

    @property
    def frames_sent(self) -> int:
        """Frames the open connections have sent so far (the ended ones' are in ``metrics``)."""
        return sum(connection.sent for connection in self.connections)

    @property
    def sse_streams(self) -> int:
        """Open connections that are SSE streams (read at scrape time: a walk over the connections)."""
        return sum(connection.transport == "sse" for connection in self.connections)

    @property
    def queued_frames(self) -> int:
        return sum(connection.queued for connection in self.connections)
