"""Token streams: a producer's tokens published as fewer events, in order.

An AI answer arrives as many small tokens. Publishing each one as an event is
the simplest thing and the right default (every token is resumable at once);
when the store is the bottleneck (many concurrent streams on one Redis), the
same text can go out in fewer, larger events. :class:`TokenStream` does that
without a timer of its own deciding the batches: while one publish is in
flight, the tokens that arrive wait in a buffer, and the next publish carries
all of them. A fast store gets one event per token; a slow one gets fewer,
larger events, exactly as many as it can take. ``min_interval`` caps the event
rate of one stream on top of that.

Only one publish per stream is in flight at a time, so the events of a stream
are stored (and delivered) in the order of the tokens they hold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._checks import check_int, check_positive
from .events import Event

__all__ = ["Publishes", "TokenStream", "text_delta"]

logger = logging.getLogger("starlette_replay.streams")

T = TypeVar("T")


class Publishes(Protocol):
    """What a :class:`TokenStream` publishes through: a ``Replay`` or its ``Publisher``."""

    async def publish(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event: ...


def text_delta(tokens: Sequence[str], first: int) -> dict[str, Any]:
    """The default event data: ``{"seq": first, "count": n, "text": "<the tokens joined>"}``.

    ``seq`` is the index of the event's first token in the stream and ``count``
    how many it holds, so a reader can check that the events follow each other.
    """
    return {"seq": first, "count": len(tokens), "text": "".join(tokens)}


class TokenStream(Generic[T]):
    """Publishes the tokens sent to it on ``topic``, coalescing them while the store is busy.

    Use it as an async context manager::

        async with TokenStream(replay, "conv:42", "answer_delta") as stream:
            async for token in llm_tokens():
                await stream.send(token)
        # here every token is stored: the final marker can follow
        await replay.publish("conv:42", "answer_end", {"text": "".join(...)})

    ``make(tokens, first)`` builds one event's data from the tokens it carries
    and the stream index of the first one (default :func:`text_delta`, for
    ``str`` tokens). ``max_tokens`` bounds the tokens in one event (None: no
    bound), ``min_interval`` the seconds between two publishes of this stream
    (0: publish as soon as the previous publish returned). ``max_buffered``
    bounds the tokens waiting: past it, :meth:`send` waits for the store
    (backpressure instead of unbounded memory).

    Leaving the block normally publishes what is buffered and waits for it; a
    publish that failed (``StoreUnavailable``, ``InvalidEvent``...) is raised
    from the block (the producer's code in it is cancelled) and from the next
    :meth:`send`. When the block raises (or is cancelled), the tokens still
    buffered are dropped, not published, and the error goes on. ``events``
    and ``tokens`` count what was published: after a failure, the stored text
    is the first ``tokens`` tokens sent.
    """

    def __init__(
        self,
        publisher: Publishes,
        topic: str,
        event_type: str = "answer_delta",
        *,
        make: Callable[[Sequence[T], int], Any] | None = None,
        max_tokens: int | None = None,
        min_interval: float = 0.0,
        max_buffered: int = 10_000,
    ) -> None:
        if max_tokens is not None:
            check_int("max_tokens", max_tokens)
        if min_interval != 0:
            check_positive("min_interval", min_interval, unit="seconds")
        check_int("max_buffered", max_buffered)
        if not math.isfinite(min_interval):
            raise ValueError(f"min_interval must be finite, not {min_interval!r}")
        self.publisher = publisher
        self.topic = topic
        self.event_type = event_type
        self.make: Callable[[Sequence[Any], int], Any] = make if make is not None else text_delta
        self.max_tokens = max_tokens
        self.min_interval = min_interval
        self.max_buffered = max_buffered
        self.events = 0  # events published
        self.tokens = 0  # tokens in them
        self._buffer: list[T] = []
        self._wake = anyio.Event()  # set when tokens are buffered or the stream closes
        self._drained = anyio.Event()  # set when the buffer falls below max_buffered
        self._closing = False
        self._failed: BaseException | None = None
        self._group: TaskGroup | None = None

    def __repr__(self) -> str:
        return (
            f"TokenStream(topic={self.topic!r}, event_type={self.event_type!r}, events={self.events}, "
            f"tokens={self.tokens}, buffered={len(self._buffer)})"
        )

    async def __aenter__(self) -> TokenStream[T]:
        if self._group is not None or self._closing:
            raise RuntimeError("a TokenStream can be entered once")
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        group.start_soon(self._flusher)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        group = self._group
        assert group is not None, "not entered"
        self._closing = True
        self._wake.set()
        if exc is not None:
            group.cancel_scope.cancel()  # the producer failed: what is buffered stays unpublished
        try:
            return await group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group_exc:
            # One failure (the producer's, or a publish's): raised as itself, not in a group.
            if len(group_exc.exceptions) == 1:
                raise group_exc.exceptions[0] from None
            raise

    async def send(self, token: T) -> None:
        """Buffer ``token`` for the next publish; waits only while ``max_buffered`` tokens are waiting.

        Raises ``RuntimeError`` outside the ``async with`` block, and the error
        of a publish that failed. Cancelling it is safe: the token is buffered
        or it is not.
        """
        if self._group is None or self._closing:
            raise RuntimeError("send() outside the TokenStream's async with block")
        while len(self._buffer) >= self.max_buffered:
            if self._failed is not None:
                raise self._failed
            self._drained = anyio.Event() if self._drained.is_set() else self._drained
            await self._drained.wait()
        if self._failed is not None:
            raise self._failed
        self._buffer.append(token)
        self._wake.set()

    async def _flusher(self) -> None:
        last = -math.inf
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._buffer:
                    wait = last + self.min_interval - anyio.current_time()
                    if wait > 0:
                        await anyio.sleep(wait)
                    take = len(self._buffer) if self.max_tokens is None else min(self.max_tokens, len(self._buffer))
                    tokens, self._buffer = self._buffer[:take], self._buffer[take:]
                    self._drained.set()
                    first = self.tokens
                    await self.publisher.publish(self.topic, self.event_type, self.make(tokens, first))
                    last = anyio.current_time()
                    self.events += 1
                    self.tokens += len(tokens)
                if self._closing:
                    return
        except BaseException as exc:
            self._failed = exc
            self._drained.set()  # a send waiting for room raises instead
            raise
