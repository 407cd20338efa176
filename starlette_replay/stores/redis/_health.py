"""RedisStore's self-check: a probe it publishes to itself through its own pub/sub path.

Every ``interval`` the store PUBLISHes a probe on a channel of its own (one
per store, so that other processes do not hear it) through its command
connections, and its listener, subscribed to that channel on every
connection it opens, hands each probe it receives back here. So one probe
tests the whole live path an event takes: a command reaches Redis and is
answered, Redis publishes, and the listener's connection is open, subscribed
and read. The store is ready while both the last answer to a probe and the
last probe received are younger than ``stall_after``; a listener that
reconnects counts as not ready until a probe came through its new connection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ...errors import StoreError
from ..base import Health

__all__ = ["Probe"]


class Probe:
    """The probe's state and its loop (:meth:`run`, in the store's task group)."""

    def __init__(
        self,
        *,
        prefix: str,
        publish: Callable[[str, str], Awaitable[Any]],
        interval: float,
        stall_after: float,
    ) -> None:
        self.channel = f"{prefix}:probe:{os.urandom(8).hex()}"
        self.raw_channel = self.channel.encode()  # as the listener gets it from Redis
        self._publish = publish
        self.interval = interval
        self.stall_after = stall_after
        self.running = False
        self.answered_at: float | None = None  # monotonic: Redis answered a probe's PUBLISH
        self.received_at: float | None = None  # monotonic: the listener received a probe
        self.error: str | None = None  # why the last probe's PUBLISH failed, if it did
        self._sending = False
        self._ticked = anyio.Event()

    async def run(self) -> None:
        """Publish a probe every ``interval`` (one at a time) until cancelled.

        The first goes out one interval after the start, not at once: the store's
        first commands (the durability check, the app's first publishes) find its
        connection idle rather than open a second one beside a probe.
        """
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    self._tick()
                    await anyio.sleep(self.interval)
                    if not self._sending:
                        self._sending = True
                        tg.start_soon(self._send)
        finally:
            self.running = False
            self.answered_at = self.received_at = None
            self._sending = False

    async def _send(self) -> None:
        try:
            await self._publish(self.channel, "probe")
        except StoreError as exc:
            self.error = str(exc)
        else:
            self.answered_at = time.monotonic()
            self.error = None
        finally:
            self._sending = False
        self._tick()

    def received(self, at: float | None = None) -> None:
        """The listener received a probe (called from its read loop: no await); ``at``
        (monotonic), when not now: on a cluster, the oldest of its primaries' last probes."""
        self.received_at = time.monotonic() if at is None else at
        self._tick()

    def listener_lost(self) -> None:
        """The listener's connection ended: a new one must show it receives probes."""
        self.received_at = None
        self._tick()

    def _tick(self) -> None:
        ticked, self._ticked = self._ticked, anyio.Event()
        ticked.set()

    async def changed(self) -> None:
        """Return at the next tick (every ``interval``), answer or probe received: for tests."""
        await self._ticked.wait()

    def health(self) -> Health:
        """What the probes found, now (no I/O)."""
        if not self.running:
            return Health(False, {"redis": "not connected (the store's connect() is not entered)"})
        now = time.monotonic()
        commands = _finding(now, self.answered_at, self.stall_after, "no answer to the probe")
        if commands != "ok" and self.error:
            commands += f" (last error: {self.error})"
        listener = _finding(now, self.received_at, self.stall_after, "no probe received")
        return Health(commands == listener == "ok", {"redis_commands": commands, "redis_listener": listener})


def _finding(now: float, at: float | None, bound: float, what: str) -> str:
    if at is None:
        return f"{what} yet"
    age = now - at
    return "ok" if age <= bound else f"{what} for {age:.1f}s (stalled past {bound:g}s)"
