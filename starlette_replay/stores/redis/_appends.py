"""Concurrent appends to one topic coalesced: one script call per topic in flight.

While one call for a topic is in flight, later appends to it queue; the next
call stores all of them, in arrival order, in one script run (each append stays
contiguous and atomic and keeps its own idempotency key). Different topics'
calls do not wait for each other: they go out together on the pipelined
connections. Keeping each topic to one script call keeps all its keys in one
cluster slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import anyio

from ...errors import StoreError, StoreUnavailable
from ...events import Event

__all__ = ["BATCH_EVENTS", "Append", "Coalescer"]

BATCH_EVENTS = 1000  # events per coalesced script call at most (an append is never split)


class Append:
    """One waiting append: what to store, and (once settled) its events or its error."""

    __slots__ = ("batch", "deadline", "error", "events", "items", "key", "topic", "wake")

    def __init__(self, topic: str, items: Sequence[tuple[str, str]], key: str | None, deadline: float) -> None:
        self.topic = topic
        self.items = items
        self.key = key
        self.deadline = deadline
        # done when settled, or when handed a batch to send (a bare future: anyio's
        # Event and a cancel scope per queued append were a third of the CPU of
        # 50 concurrent publishers)
        self.wake: asyncio.Future[None] | None = None
        self.batch: list[Append] | None = None  # the batch it was taken into
        self.events: list[Event] | None = None
        self.error: BaseException | None = None

    def result(self) -> list[Event]:
        if self.events is not None:
            return self.events
        error = self.error
        if isinstance(error, StoreUnavailable):
            raise StoreUnavailable(str(error)) from error
        if isinstance(error, StoreError):
            raise StoreError(str(error)) from error
        raise StoreError(f"Redis append failed: {error!r}") from error


def _give_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_exception(TimeoutError())


def _wake(request: Append) -> None:
    wake = request.wake
    if wake is not None and not wake.done():  # done: woken already, or its wait was cancelled
        wake.set_result(None)


class Coalescer:
    """The per-topic queues. ``store_batch(topic, batch)`` stores one batch (one script
    call) and sets each append's ``events``, or raises."""

    def __init__(self, store_batch: Callable[[str, list[Append]], Awaitable[None]], publish_timeout: float) -> None:
        self.store_batch = store_batch
        self.publish_timeout = publish_timeout
        self._queues: dict[str, deque[Append]] = {}  # topic -> appends waiting while one call is in flight

    async def append(self, topic: str, items: Sequence[tuple[str, str]], key: str | None) -> list[Event]:
        """Store ``items`` as one append, coalesced with the topic's other appends (see RedisStore.append)."""
        loop = asyncio.get_running_loop()
        request = Append(topic, items, key, loop.time() + self.publish_timeout)
        queue = self._queues.get(topic)
        if queue is None:
            self._queues[topic] = deque()  # this call is the topic's sender now
            batch = [request]
        else:
            queue.append(request)
            request.wake = wake = loop.create_future()
            # A safety net: the call in flight ends by its own (earlier) deadline, then
            # hands over. A bare timer, not a timeout scope: this is per queued append.
            net = loop.call_at(loop.time() + 2 * self.publish_timeout + 1, _give_up, wake)
            try:
                await wake
            except BaseException as exc:
                if request.batch is None:
                    queue.remove(request)  # never sent: nothing stored
                    if isinstance(exc, TimeoutError):
                        raise StoreUnavailable(f"not stored: no turn to append to {topic!r} in time") from exc
                elif request.batch[0] is request and request.events is None and request.error is None:
                    # handed the next batch as the wait ended: send it for the others
                    with anyio.CancelScope(shield=True):
                        await self._send_batch(topic, request.batch)
                    if isinstance(exc, TimeoutError):
                        return request.result()
                elif isinstance(exc, TimeoutError):
                    raise StoreUnavailable(f"Redis did not confirm an append to {topic!r} in time") from exc
                raise
            finally:
                net.cancel()
            if request.batch is None or request.batch[0] is not request:
                return request.result()  # settled by another call
            batch = request.batch
        await self._send_batch(topic, batch)
        return request.result()

    async def _send_batch(self, topic: str, batch: list[Append]) -> None:
        """Store ``batch`` (one script call), settle each of its appends, hand the queue on.

        Shielded when others share the batch: a cancelled caller finishes it (within
        the first append's deadline); its cancellation takes effect afterwards.
        """
        try:
            try:
                if len(batch) == 1:
                    await self.store_batch(topic, batch)
                else:
                    with anyio.CancelScope(shield=True):
                        await self.store_batch(topic, batch)
            except Exception as exc:
                for request in batch:
                    if request.events is None and request.error is None:
                        request.error = exc
        finally:
            for request in batch:
                if request.events is None and request.error is None:  # only if the code above is wrong
                    request.error = StoreError("the append was interrupted")
                _wake(request)
            queue = self._queues.get(topic)
            if queue:
                taken: list[Append] = []
                size = 0
                while queue and (not taken or size + len(queue[0].items) <= BATCH_EVENTS):
                    request = queue.popleft()
                    taken.append(request)
                    size += len(request.items)
                taken[0].batch = taken
                for request in taken[1:]:
                    request.batch = taken
                _wake(taken[0])  # the first queued append sends the next batch
            elif queue is not None:
                del self._queues[topic]
