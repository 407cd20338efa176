"""Pipelined commands on a few connections: many commands in flight, replies matched in order.

redis-py has no automatic pipelining: each command of its asyncio client
checks a connection out of its pool and waits for the reply before the
connection serves another, so concurrency costs connections (one per command
in flight, with a TCP handshake, AUTH and SELECT for each new one). Here a
store keeps a fixed number of connections (``Pipelines``), each a ``Pipe``:

* callers **submit** packed commands; every command submitted in one loop turn
  goes out in **one write** (the pipe's task wakes once per turn, takes the
  whole outbox and writes it);
* the pipe's **reader** task reads replies as they come (hiredis parses every
  reply already buffered without another socket read) and hands each to the
  oldest command still owed a reply: Redis answers one connection's commands
  in the order it received them;
* a caller that is **cancelled** (or whose deadline passes) stops waiting; a
  command still in the outbox is then never sent, one already sent keeps its
  place, and its reply is read and dropped, so the replies of the others stay
  matched;
* a lost connection fails every command on it, telling apart those never sent
  (:class:`NotSent`: safe to send again) from those sent and unanswered
  (:class:`ReplyLost`: they may have run), and the next command opens a new
  connection in its place. A connection that gave no reply for a whole
  ``stall_after`` while a caller waited on it is taken for dead (a half-open
  link, a frozen server) and closed the same way;
* each call carries its deadline, and one timer per store fails the calls
  whose deadline passed (a timeout scope per command cost more than the rest
  of the call).

redis-py still makes and owns each connection (TCP or TLS or Unix socket,
AUTH, SELECT, HELLO, client name: the client's settings), and parses replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._codec import redis_errors

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["NotSent", "Pipe", "Pipelines", "ReplyLost"]

logger = logging.getLogger("starlette_replay.stores.redis.pipeline")


class NotSent(ConnectionError):
    """The command never left this process: sending it again is safe."""


class ReplyLost(ConnectionError):
    """The command was sent, and its connection was lost before the reply: it may have run."""


class _Call:
    __slots__ = ("deadline", "future", "packed", "sent_at", "skip")

    def __init__(self, future: asyncio.Future[Any], packed: bytes, deadline: float, skip: int = 0) -> None:
        self.future = future
        self.packed = packed
        self.deadline = deadline  # the loop's clock
        self.sent_at: float | None = None  # the loop's clock when it was written
        # replies to read and drop before the one that is the call's (ASKING's +OK)
        self.skip = skip


def _settle(calls: Any, error: BaseException) -> None:
    for call in calls:
        if not call.future.done():
            call.future.set_exception(error)


class Pipe:
    """One Redis connection carrying any number of commands at once (see the module docstring)."""

    __slots__ = (
        "_conn",
        "_direct",
        "_in_flight",
        "_loop",
        "_outbox",
        "_reader",
        "_stream",
        "_task",
        "_wakeup",
        "closed",
        "last_reply",
        "name",
    )

    def __init__(self, conn: AbstractConnection, *, name: str, connect_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn = conn
        self.name = name
        self._outbox: list[_Call] = []  # submitted, not written yet
        self._in_flight: deque[_Call] = deque()  # written, owed a reply, in the order written
        self._wakeup: asyncio.Future[None] | None = None  # the writer's, while it waits for commands
        self._reader: asyncio.Task[None] | None = None
        # redis-py's StreamWriter for the connection, once connected: see submit()
        self._stream: asyncio.StreamWriter | None = None
        self._direct = True  # no command written directly yet in this loop turn
        self.closed = False
        self.last_reply = self._loop.time()
        # A task of the pipe's own, not of a task group: commands run outside the
        # store's connect() too (a publish-only script). Pipelines.aclose() ends it.
        self._task = self._loop.create_task(self._run(connect_timeout), name=f"starlette_replay {name}")

    @property
    def load(self) -> int:
        """Commands submitted and not answered yet."""
        return len(self._outbox) + len(self._in_flight)

    @property
    def finished(self) -> bool:
        """Closed, and its connection closed too."""
        return self._task.done()

    def submit(self, packed: bytes, deadline: float, replies: int = 1) -> _Call:
        """Queue packed commands that get ``replies`` replies, the last one the call's
        (``ASKING`` and a command: two); written at the end of this loop turn, with the others."""
        if self.closed:
            raise NotSent(f"{self.name} is closed")
        call = _Call(self._loop.create_future(), packed, deadline, replies - 1)
        wakeup = self._wakeup
        stream = self._stream
        if (
            self._direct
            and stream is not None
            and wakeup is not None
            and not wakeup.done()
            and not stream.transport.is_closing()
        ):
            # The writer is parked with nothing to write: write this command now, and
            # let the rest of this loop turn's commands go out together after it (a
            # lone publisher would otherwise wait a turn for the writer's task on
            # every command: about a third of its rate). A write that cannot go out
            # at once is buffered by the transport; a lost connection is the
            # reader's to report, as for any command in flight.
            call.sent_at = self._loop.time()
            call.packed = b""
            self._in_flight.append(call)
            stream.write(packed)
            self._direct = False
            self._loop.call_soon(self._allow_direct)
            return call
        self._outbox.append(call)
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return call

    def _allow_direct(self) -> None:
        self._direct = True

    async def _run(self, connect_timeout: float) -> None:
        """Connect, start the reader, then write what callers submit, one write per loop turn."""
        conn = self._conn
        loop = self._loop
        try:
            async with asyncio.timeout_at(loop.time() + connect_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
            self._reader = loop.create_task(self._read(), name=f"starlette_replay {self.name} reader")
            # redis-py has no public way to write without awaiting a drain; its
            # connection's StreamWriter is private (a test pins it): without it,
            # every command goes through this task.
            stream = getattr(conn, "_writer", None)
            self._stream = stream if isinstance(stream, asyncio.StreamWriter) else None
            while True:
                if not self._outbox:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                calls, self._outbox = self._outbox, []
                # A caller that gave up before its command was written: it is never sent.
                calls = [call for call in calls if not call.future.done()]
                if not calls:
                    continue
                now = loop.time()
                for call in calls:
                    call.sent_at = now
                self._in_flight.extend(calls)
                packed = calls[0].packed if len(calls) == 1 else b"".join([call.packed for call in calls])
                for call in calls:
                    call.packed = b""  # written: not kept while the reply is awaited
                await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            # A lost connection is the callers' news (through _fail), not the task's error.
            self._fail(exc)
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
        finally:
            reader = self._reader
            if reader is not None and not reader.done():
                reader.cancel()
                await asyncio.wait([reader])  # it reported its own end through _fail
            try:
                await conn.disconnect(nowait=True)
            except Exception as exc:  # pragma: no cover - closing a transport hardly fails
                logger.debug("%s: closing the connection failed: %r", self.name, exc)

    async def _read(self) -> None:
        conn = self._conn
        loop = self._loop
        in_flight = self._in_flight
        response_error = redis_errors().ResponseError
        try:
            while True:
                error: BaseException | None = None
                try:
                    reply = await conn.read_response(disable_decoding=True)
                except response_error as exc:  # a complete error reply: the connection stays in step
                    reply, error = None, exc
                self.last_reply = loop.time()
                if not in_flight:
                    raise redis_errors().InvalidResponse(f"{self.name}: a reply that no command asked for")
                if in_flight[0].skip:  # a reply before the call's own (ASKING's); an error shows in the next
                    in_flight[0].skip -= 1
                    continue
                future = in_flight.popleft().future
                if not future.done():  # done: its caller gave up; the reply is dropped
                    if error is None:
                        future.set_result(reply)
                    else:
                        future.set_exception(error)
        except BaseException as exc:
            self._fail(exc)
            self._task.cancel()  # the writer closes the connection
            if not isinstance(exc, asyncio.CancelledError):
                logger.debug("%s: reading replies failed: %r", self.name, exc)

    def _fail(self, cause: BaseException) -> None:
        """Close for good: every command on the pipe fails, by whether it was sent."""
        if self.closed:
            return
        self.closed = True
        outbox, self._outbox = self._outbox, []
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        if isinstance(cause, asyncio.CancelledError):
            cause = ConnectionError(f"{self.name} was closed")
        _settle(outbox, NotSent(f"{self.name}: no connection to Redis ({cause!r})"))
        _settle(in_flight, ReplyLost(f"{self.name}: lost Redis while waiting for a reply ({cause!r})"))
        if in_flight:
            logger.warning("%s lost (%r): %d commands in flight failed", self.name, cause, len(in_flight))
        else:
            logger.debug("%s closed (%r)", self.name, cause)

    def expire(self, now: float, stall_after: float) -> None:
        """Fail the calls whose deadline passed; close the pipe if it looks dead.

        Dead: a call written ``stall_after`` ago or more is still unanswered, and
        no reply at all came since it was written (a frozen Redis, a half-open link).
        """
        for calls in (self._outbox, self._in_flight):
            for call in calls:
                if call.deadline <= now and not call.future.done():
                    call.future.set_exception(TimeoutError())
        if self._in_flight:
            oldest = self._in_flight[0].sent_at
            if oldest is not None and now - oldest >= stall_after and self.last_reply <= oldest:
                self.abort(TimeoutError(f"no reply from Redis for {stall_after:g}s"))

    def abort(self, cause: BaseException) -> None:
        """Fail every command on the pipe and close its connection (soon, in its task)."""
        self._fail(cause)
        self._task.cancel()

    async def aclose(self) -> None:
        """Close; wait until the connection is closed. Safe to call twice."""
        self.abort(ConnectionError(f"{self.name} closed by the store"))
        task = self._task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # the caller was cancelled, not the pipe's task before it ran
                raise


class Pipelines:
    """A fixed number of :class:`Pipe` slots, opened on first use and reopened after a loss.

    ``connect`` makes a new, unconnected redis-py connection for a slot.
    Redis sees at most ``size`` connections from here (briefly one more per
    slot while a lost connection is still being closed).
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        *,
        size: int,
        connect_timeout: float,
        stall_after: float,
    ) -> None:
        self._connect = connect
        self._slots: list[Pipe | None] = [None] * size
        self._opened = 0
        self.connect_timeout = connect_timeout
        self.stall_after = stall_after
        self.closed = False
        # One timer for every call's deadline, not a timeout per call: a timer and a
        # timeout scope per command were a tenth of the CPU of 2,000 concurrent
        # publishers (and garbage for the collector to trace).
        self._sweep_every = min(0.1, stall_after / 10)
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def in_flight(self) -> int:
        """Commands submitted on the open connections and not answered yet."""
        return sum(pipe.load for pipe in self._slots if pipe is not None and not pipe.closed)

    def _pick(self) -> Pipe:
        """The open pipe with the fewest commands owed; a new one in a free slot when all are busy."""
        best: Pipe | None = None
        free = -1
        for i, pipe in enumerate(self._slots):
            if pipe is None or pipe.closed:
                if free < 0 and (pipe is None or pipe.finished):
                    free = i
                continue
            if best is None or pipe.load < best.load:
                best = pipe
                if not pipe.load:
                    return pipe
        if best is not None and free < 0:
            return best
        if free < 0:  # every pipe is closing after a loss: take the first slot again
            free = 0
        self._opened += 1
        name = f"redis command connection {free}#{self._opened}"
        pipe = Pipe(self._connect(), name=name, connect_timeout=self.connect_timeout)
        self._slots[free] = pipe
        return pipe

    def call(self, packed: bytes, deadline: float, replies: int = 1) -> asyncio.Future[Any]:
        """Send one packed command; the future is its reply (raw, undecoded).

        ``replies`` > 1: ``packed`` holds several commands (``ASKING`` and the
        command), and the future is the last one's reply.

        The future raises what Redis answered (a ``ResponseError``),
        :class:`NotSent`, :class:`ReplyLost`, or ``TimeoutError`` once
        ``deadline`` (the loop's clock) has passed (checked every
        ``stall_after / 10``, at most 0.1 s). A pipe that answered nothing for
        ``stall_after`` while a call waited on it is closed (the commands still
        on it fail with ``ReplyLost``). Raises :class:`NotSent` at once when
        closed. Cancelling the future (or a task awaiting it) is safe: the
        command is not sent if it was not yet, and otherwise its reply is
        dropped when it comes. A plain function, not a coroutine: a caller
        awaits the future itself, one frame less on every resume.
        """
        if self.closed:
            raise NotSent("the store is closed")
        call = self._pick().submit(packed, deadline, replies)
        if self._sweeper is None:
            loop = call.future.get_loop()
            self._sweeper = loop.call_at(loop.time() + self._sweep_every, self._sweep, loop)
        return call.future

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        busy = False
        for pipe in self._slots:
            if pipe is not None and not pipe.closed and pipe.load:
                pipe.expire(now, self.stall_after)
                busy = busy or bool(pipe.load)
        self._sweeper = loop.call_at(now + self._sweep_every, self._sweep, loop) if busy else None

    async def aclose(self) -> None:
        """Close every connection (a later call opens new ones unless ``closed``). Safe to call twice."""
        slots = [pipe for pipe in self._slots if pipe is not None]
        self._slots = [None] * len(self._slots)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pipe in slots:
            await pipe.aclose()
