"""The live side of RedisStore: one pub/sub connection per store, for every topic it watches.

On a Redis Cluster there is one such listener per primary, each speaking
sharded pub/sub (``SSUBSCRIBE``; see ``_shards``), with two hooks for the
topology: ``on_lost`` when its connection fails, ``on_dropped`` when the
server unsubscribed a topic by itself (its slot moved away); and
:meth:`Listener.release` / :meth:`Listener.adopt` hand a topic, with where
it stands, to the listener of another node.

The listener tracks the last offset delivered per topic, repairs any hole from
the stream, and after a reconnect repairs every topic from where it stood;
when it cannot (epoch changed, history trimmed, head moved back) it calls
``sink.reset(topic)``. It speaks RESP2 (plain arrays for pub/sub).

Built for many topics at once: SUBSCRIBE and UNSUBSCRIBE commands queued in one
loop turn go out in one write, merged into commands of up to
``_CHANNELS_PER_COMMAND`` channels (a reconnect resubscribes a thousand topics
in one or two commands); every message already buffered is read before any is
handled; and the read loop never waits for Redis itself. A topic that needs a
round trip (its baseline once subscribed, or a repair) is handed to a task of
its own, which holds the topic's later messages meanwhile and then handles
them in order, while the other topics' messages keep flowing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from ...errors import StoreError, StoreUnavailable
from ...events import Event
from ..base import LiveSink, Position
from ._codec import packer, parse_entries, parse_payload, redis_errors, text

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["Listener", "ProbeSink"]

logger = logging.getLogger("starlette_replay.stores.redis.listener")

_CHANNELS_PER_COMMAND = 1000
_READ_BATCH = 1000  # replies read from the buffer before handling them
_REPAIR_PAGE = 500

# sharded pub/sub's replies, as the classic ones they mirror
_SHARDED_KINDS = {b"smessage": b"message", b"ssubscribe": b"subscribe", b"sunsubscribe": b"unsubscribe"}


class ProbeSink(Protocol):
    """What the listener tells the store's health probe (``_health.Probe``)."""

    channel: str
    raw_channel: bytes

    def received(self, at: float | None = None) -> None: ...

    def listener_lost(self) -> None: ...


#: reads a topic's position and up to ``limit`` entries after ``after`` (None: no such topic)
ReadState = Callable[[str, int, int], Awaitable[tuple[Position | None, Any]]]


class _Topic:
    """What the listener knows of one subscribed topic."""

    __slots__ = ("based", "busy", "channel", "confirm", "epoch", "held", "last", "last_time", "ready")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.based = False  # baseline read after Redis confirmed the subscription
        self.epoch: str | None = None  # None: the topic did not exist at the baseline
        self.last = 0
        self.last_time: int | None = None  # the `time` of the event delivered at `last`, once one was
        self.ready = anyio.Event()
        self.busy = False  # a task of its own is handling it: messages wait in `held`
        self.held: list[Event] = []
        self.confirm = False  # Redis confirmed a subscription that the task must act on


class Listener:
    """Live events of the subscribed topics, from Redis pub/sub to ``sink``."""

    def __init__(
        self,
        *,
        new_connection: Callable[[], AbstractConnection],
        read_state: ReadState,
        channel: Callable[[str], str],
        publish_timeout: float,
        health_check_interval: float,
        slot: Callable[[str], int] | None = None,
        on_lost: Callable[[], None] | None = None,
        on_dropped: Callable[[str, _Topic], None] | None = None,
    ) -> None:
        self._new_connection = new_connection
        self._read_state = read_state
        self._channel = channel
        self.publish_timeout = publish_timeout
        self.health_check_interval = health_check_interval
        # With ``slot``: sharded pub/sub (SSUBSCRIBE ...), each command naming one slot's channels.
        self._slot = slot
        self._sharded = slot is not None
        self._on_lost = on_lost
        self._on_dropped = on_dropped
        self.sink: LiveSink | None = None
        self.topics: dict[str, _Topic] = {}
        self._by_channel: dict[bytes, str] = {}  # as Redis sends it -> topic
        self._conn: AbstractConnection | None = None  # the pub/sub connection, when up
        self._tasks: anyio.abc.TaskGroup | None = None  # the connection's: topic tasks, the writer
        self._expect: dict[bytes, deque[bool]] = {}  # channel -> confirmations due (True: subscribe)
        self._outbox: list[tuple[str, str]] = []  # commands for the writer: (verb, channel or "")
        self._wakeup: asyncio.Future[None] | None = None
        self._reading_since: float | None = None  # when the pending read began
        #: times the listener (re)connected, and resets it had to call; for tests and metrics
        self.reconnects = 0
        self.resets = 0
        # The store's self-check: its channel is subscribed on every connection (on a cluster
        # with classic SUBSCRIBE: the probe's PUBLISH reaches every node). Anything with the
        # ProbeSink: the store's _health.Probe, or on a cluster a stand-in for each node's
        # listener (_shards).
        self.probe: ProbeSink | None = None

    # --- subscriptions --------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        """Watch ``topic``; returns once Redis confirmed it and its baseline is read.

        Raises ``StoreUnavailable`` after ``publish_timeout``; cancelling is safe.
        """
        state = self.topics.get(topic)
        if state is None:
            state = self.topics[topic] = _Topic(self._channel(topic))
            self._by_channel[state.channel.encode()] = topic
            if self._conn is not None:
                self._queue("SUBSCRIBE", state.channel)
        try:
            with anyio.move_on_after(self.publish_timeout):
                await state.ready.wait()
        finally:
            if not state.ready.is_set() and self.topics.get(topic) is state:
                # not confirmed (timeout or cancelled): do not leave it subscribed behind the caller's back
                self.unsubscribe(topic)
        if not state.ready.is_set():
            raise StoreUnavailable(f"Redis did not confirm the subscription to {topic!r} within publish_timeout")

    def unsubscribe(self, topic: str) -> None:
        """Stop watching ``topic``. Never fails; what is still on its way for it is dropped."""
        self.release(topic)

    def release(self, topic: str) -> _Topic | None:
        """Stop watching ``topic`` here; returns where it stood (for :meth:`adopt` on another
        listener), or None when it was not watched here."""
        state = self.topics.pop(topic, None)
        if state is None:
            return None
        self._by_channel.pop(state.channel.encode(), None)
        if self._conn is not None:
            self._queue("UNSUBSCRIBE", state.channel)
        return state

    def adopt(self, topic: str, old: _Topic) -> None:
        """Watch ``topic`` from where ``old`` (released by another listener) stood: once this
        connection confirms it, what was published since ``old.last`` is repaired from the
        stream, as after a reconnect. A ``subscribe()`` still waiting for ``old`` returns then."""
        state = self.topics[topic] = _Topic(self._channel(topic))
        state.based, state.epoch, state.last, state.last_time = old.based, old.epoch, old.last, old.last_time
        state.ready = old.ready
        self._by_channel[state.channel.encode()] = topic
        if self._conn is not None:
            self._queue("SUBSCRIBE", state.channel)

    def clear(self) -> None:
        """Forget every topic (the store left its ``connect()``)."""
        self.topics.clear()
        self._by_channel.clear()

    def _queue(self, verb: str, channel: str = "") -> None:
        """Queue a command for the connection's writer (sent at the end of this loop turn)."""
        if verb != "PING":
            self._expect.setdefault(channel.encode(), deque()).append(verb == "SUBSCRIBE")
        self._outbox.append((verb, channel))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # --- the connection -------------------------------------------------------------

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with a jittered, bounded backoff."""
        redis_error = redis_errors().RedisError
        failures = 0
        while True:
            connected = self.reconnects
            try:
                await self._listen_once()
            except Exception as exc:
                # a task group wraps the reader's error: log the error itself
                while len(getattr(exc, "exceptions", ())) == 1:
                    exc = exc.exceptions[0]  # type: ignore[attr-defined]
                if self._sharded and "unknown command" in str(exc).lower():
                    logger.error("%s: Redis Cluster live events need Redis 7.0+ (sharded pub/sub)", exc)
                elif isinstance(exc, redis_error | StoreError | OSError):  # OSError: TimeoutError too
                    level = logging.WARNING if failures <= 1 else logging.DEBUG
                    logger.log(level, "Redis pub/sub connection lost (%r); reconnecting", exc)
                else:  # a bug: say so loudly, and keep serving
                    logger.error("the Redis listener failed; reconnecting", exc_info=exc)
            finally:
                conn, self._conn = self._conn, None
                self._tasks = None
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.disconnect(nowait=True)
                if self.probe is not None:
                    self.probe.listener_lost()
            if self._on_lost is not None:
                self._on_lost()  # on a cluster: the node may be gone, or hold other slots now
            # 50 ms doubling up to 2 s, from the start again once a connection was
            # made (Redis is up: come back quickly).
            failures = 1 if self.reconnects != connected else failures + 1
            await anyio.sleep(min(2.0, 0.05 * 2 ** min(failures - 1, 6)) * random.uniform(0.5, 1.0))

    async def _listen_once(self) -> None:
        # No read timeout on this connection: the pinger and the watchdog see a dead link.
        conn = self._new_connection()
        try:
            with anyio.fail_after(self.publish_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        self._expect = {}  # confirmations due on this connection
        self._outbox = []
        self.reconnects += 1
        if self.reconnects > 1:
            logger.info("Redis pub/sub connection reopened; repairing %d topics", len(self.topics))
        for state in self.topics.values():
            state.busy, state.held, state.confirm = False, [], False  # their tasks ended with the last connection
            self._queue("SUBSCRIBE", state.channel)
        if self.probe is not None:
            self._queue("SUBSCRIBE", self.probe.channel)
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            tg.start_soon(self._write, conn)
            tg.start_soon(self._watch)
            # redis-py 8's can_read() looks at the buffer without taking from it. Older
            # ones have only can_read_destructive(), whose hiredis parser drops a reply
            # already buffered (redis-py 5.0 with hiredis lost live messages so): there,
            # read one reply at a time.
            can_read = getattr(conn, "can_read", None)
            while True:
                # The read blocks without a timer of its own: _watch bounds it.
                self._reading_since = time.monotonic()
                replies = [await conn.read_response(disable_decoding=True)]
                self._reading_since = None
                while can_read is not None and len(replies) < _READ_BATCH and await can_read():  # buffered
                    replies.append(await conn.read_response(disable_decoding=True))
                # Delivering may send to every local subscriber from this task (inline
                # sends): let the tasks that are ready run first, so that a publisher's
                # next append goes out to Redis before those sends, not after them.
                await asyncio.sleep(0)
                for reply in replies:
                    self._handle(reply)

    async def _write(self, conn: AbstractConnection) -> None:
        """Send what was queued, one write per loop turn, same-verb commands merged
        (sharded: merged per slot, as one SSUBSCRIBE may name only one slot's channels)."""
        loop = asyncio.get_running_loop()
        pack = packer()
        prefix = "S" if self._sharded else ""
        while True:
            if not self._outbox:
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
            commands, self._outbox = self._outbox, []
            parts: list[bytes] = []
            verb, channels = "", list[str]()
            for next_verb, channel in [*commands, ("", "")]:
                if channels and next_verb != verb:
                    for sharded, group in self._groups(channels):
                        parts.append(pack(((prefix if sharded else "") + verb, *group)))
                    channels = []
                if next_verb == "PING":
                    parts.append(pack(("PING",)))
                elif next_verb:
                    verb = next_verb
                    channels.append(channel)
            await conn.send_packed_command(b"".join(parts), check_health=False)

    def _groups(self, channels: list[str]) -> list[tuple[bool, list[str]]]:
        """``channels`` (of one verb) cut into commands, each with whether it is sharded: at
        most ``_CHANNELS_PER_COMMAND`` each, and of one slot each when sharded (a channel's
        own commands keep their order); the probe's channel is classic pub/sub."""
        by_slot: dict[int, list[str]] = {}
        if self._slot is None:
            by_slot[0] = channels
        else:
            probe = self.probe.channel if self.probe is not None else None
            for channel in channels:
                by_slot.setdefault(-1 if channel == probe else self._slot(channel), []).append(channel)
        return [
            (self._sharded and slot >= 0, group[i : i + _CHANNELS_PER_COMMAND])
            for slot, group in by_slot.items()
            for i in range(0, len(group), _CHANNELS_PER_COMMAND)
        ]

    async def _watch(self) -> None:
        """PING every ``health_check_interval``; a read waiting longer than two of them
        (plus a second) means a dead link: raise, and the listener reconnects."""
        limit = self.health_check_interval * 2 + 1
        while True:
            await anyio.sleep(self.health_check_interval)
            since = self._reading_since
            if since is not None and time.monotonic() - since > limit:
                raise TimeoutError(f"no reply on the Redis pub/sub connection for {limit:g}s")
            self._queue("PING")

    # --- messages -------------------------------------------------------------------

    def _handle(self, reply: Any) -> None:
        # RESP2, undecoded: [b"message", channel, payload], [b"subscribe", channel, n], ...
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG outside subscribed mode
        kind = reply[0]
        if self._sharded:
            kind = _SHARDED_KINDS.get(kind, kind)
        if kind == b"message":
            topic = self._by_channel.get(reply[1])
            if topic is None:
                if self.probe is not None and reply[1] == self.probe.raw_channel:
                    self.probe.received()
                return
            state = self.topics[topic]
            if not state.based and not state.busy:
                return  # from before this subscription was confirmed
            try:
                events = parse_payload(topic, reply[2])
            except ValueError:
                # not ours (someone else published on the channel): the stream is the truth
                logger.warning("ignoring a malformed message on %s", text(reply[1]))
                return
            if state.busy:
                state.held.extend(events)
                return
            for i, event in enumerate(events):
                if not self._offer(topic, state, event):  # a hole: repair from the stream first
                    state.held = events[i:]
                    self._start(topic, state)
                    return
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = reply[1]
            due = self._expect.get(channel)
            topic = self._by_channel.get(channel)
            if due:
                due.popleft()
                if due:
                    return  # a later (un)subscribe is still on its way
                del self._expect[channel]
            elif kind == b"unsubscribe":
                if topic is not None and self._on_dropped is not None:
                    # Not asked for: the server dropped it (its slot moved to another node)
                    state = self.topics.pop(topic)
                    del self._by_channel[channel]
                    self._on_dropped(topic, state)
                return
            if kind == b"subscribe" and topic is not None:
                state = self.topics[topic]
                state.confirm = True
                self._start(topic, state)

    def _start(self, topic: str, state: _Topic) -> None:
        if not state.busy and self._tasks is not None:
            state.busy = True
            self._tasks.start_soon(self._work, topic, state)

    async def _work(self, topic: str, state: _Topic) -> None:
        """A topic's round trips: its baseline or repair, then the messages held meanwhile.

        Its errors (Redis unreachable) end the connection's task group: the
        listener reconnects and repairs every topic.
        """
        try:
            while self.topics.get(topic) is state:
                if state.confirm:
                    state.confirm = False
                    await self._confirmed(topic, state)
                    continue
                if not state.held:
                    break
                events, state.held = state.held, []
                for event in events:
                    if not self._offer(topic, state, event):
                        await self._repair(topic, state, event.offset - 1)
                        if self.topics.get(topic) is not state:
                            return
                        if state.epoch == event.epoch and event.offset == state.last + 1:
                            self._deliver(state, event)
        finally:
            state.busy = False

    async def _confirmed(self, topic: str, state: _Topic) -> None:
        """Redis confirmed ``topic``: set its baseline, or repair it after a reconnect.

        After a reconnect the event at the last offset delivered is read too: an
        event with another ``time`` there means Redis lost acknowledged events
        and reused their offsets (a fail-over to a replica that missed them, an
        old AOF), even where new publishes carried the head past where it was.
        """
        check = state.based and state.last > 0 and state.last_time is not None
        position, entries = await self._read_state(topic, state.last - 1 if check else 0, 1 if check else 0)
        if self.topics.get(topic) is not state:
            return
        if not state.based:
            state.based = True
            if position is not None:
                state.epoch, state.last = position.epoch, position.head
            state.ready.set()
            return
        if position is None:
            if state.epoch is not None:
                self._reset(topic, state, "topic history lost in Redis", None, 0)
            return
        if state.epoch is None:
            state.epoch = position.epoch
        elif position.epoch != state.epoch:
            self._reset(topic, state, "topic epoch changed", position.epoch, position.head)
            return
        elif position.head < state.last:
            # Same epoch, older head: Redis lost writes it had acknowledged (a failover
            # or an old AOF). Offsets will be reused; the clients must hear of it.
            self._reset(topic, state, "Redis lost acknowledged events (head moved back)", position.epoch, position.head)
            return
        elif check and position.oldest <= state.last:  # still retained: it must be the one delivered
            held = parse_entries(topic, position.epoch, entries)
            if not held or held[0].offset != state.last or held[0].time != state.last_time:
                reason = "Redis lost acknowledged events and reused their offsets (another event at one delivered)"
                self._reset(topic, state, reason, position.epoch, position.head)
                return
        if position.head > state.last:
            await self._repair(topic, state, position.head)

    def _offer(self, topic: str, state: _Topic, event: Event) -> bool:
        """Deliver ``event`` if it is the next one (or drop it if already delivered);
        False when events before it are missing (a repair must come first)."""
        if state.epoch != event.epoch:
            if state.epoch is None:
                state.epoch, state.last = event.epoch, 0
            else:
                self._reset(topic, state, "topic epoch changed", event.epoch, event.offset - 1)
        if event.offset <= state.last:
            return True
        if event.offset > state.last + 1:
            return False
        self._deliver(state, event)
        return True

    def _reset(self, topic: str, state: _Topic, reason: str, epoch: str | None, last: int) -> None:
        self.resets += 1
        state.epoch, state.last, state.last_time = epoch, last, None
        logger.warning("cannot vouch for live events of %r: %s", topic, reason)
        if self.sink is not None:
            self.sink.reset(topic, reason)

    async def _repair(self, topic: str, state: _Topic, upto: int) -> None:
        """Deliver ``state.last + 1 .. upto`` from the stream, or reset the topic."""
        epoch = state.epoch
        while state.last < upto:
            position, entries = await self._read_state(topic, state.last, min(_REPAIR_PAGE, upto - state.last))
            if self.topics.get(topic) is not state:
                return
            events = [] if position is None else parse_entries(topic, position.epoch, entries)
            if position is None or position.epoch != epoch or not events or events[0].offset != state.last + 1:
                self._reset(topic, state, "live events missed and no longer retained", epoch, upto)
                return
            for event in events:
                if event.offset > upto:
                    break
                if event.offset != state.last + 1:  # a hole inside the stream (XDEL)
                    self._reset(topic, state, "live events missed and no longer retained", epoch, upto)
                    return
                self._deliver(state, event)

    def _deliver(self, state: _Topic, event: Event) -> None:
        """``event`` is the topic's next one: remember where it stands, hand it on."""
        state.last = event.offset
        state.last_time = event.time
        sink = self.sink
        if sink is not None:
            sink.deliver(event)
