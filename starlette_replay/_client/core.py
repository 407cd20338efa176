"""The client's rules as a pure state machine: server frames in, actions out.

No I/O, no awaits, no clock of its own (the pacer is given the time). The
Python client (:class:`~starlette_replay.client.ReplayClient`) does only the
I/O around it; the scenario files in ``tests/scenarios/`` state the same rules
as data, and run against this module and against the browser client.

The rules, each written once (the contract is ``shared/protocol.md``):

- **Contiguity** (:func:`follows`): in a topic, the next offset is delivered,
  an offset at or below the cursor is a duplicate (dropped), one further ahead
  is a gap (subscribe again from the cursor: the server replays the rest).
- **Positions after** ``subscribed``: the events that follow are
  ``offset - replayed + 1 ...``. The client has a gap (a :class:`Reset`) when
  the server says so (``resumed and not recovered``) *and* when those offsets
  cannot continue its cursor (another epoch, or a start past the cursor): the
  flags cannot promise events the offsets say will not come. A start before the
  cursor only means duplicates, which contiguity drops.
- **Replies are matched by ref**: every frame the client sends carries one, the
  server echoes it on the reply or error for that frame; a reply or error
  without the ref of a frame in flight answers nothing of ours (an error is
  still reported).
- **Close codes**: stop on 1000, 1008, 1009 (and HTTP 4xx at the handshake but
  408/429); reconnect with backoff on anything else.
- **Pacing**: the client's own frames go out through a token bucket
  (:class:`Pacer`) kept below the server's frame rate, whose excess is dropped
  and then closed with 1008.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..events import Event
from ..protocol import (
    MAX_OFFSET,
    CloseCode,
    ErrorCode,
    ErrorFrame,
    EventFrame,
    ServerFrame,
    Subscribe,
    Subscribed,
    encode_client_frame,
)
from ..stores.base import Cursor
from .backoff import Backoff
from .errors import ServerClosed, ServerError

__all__ = [
    "FATAL_CLOSE",
    "RETRYABLE",
    "TROUBLE_CLOSE",
    "AckRefused",
    "Action",
    "ClientCore",
    "Confirmed",
    "Deliver",
    "ErrorReceived",
    "Item",
    "Pacer",
    "Refused",
    "Reset",
    "RetrySubscribe",
    "Send",
    "TopicState",
    "Unmatched",
    "close_stop",
    "follows",
    "is_offset",
    "status_retryable",
]

logger = logging.getLogger("starlette_replay.client")

# Refusals of a subscribe that another try may cure.
RETRYABLE = frozenset({ErrorCode.UNAVAILABLE.value, ErrorCode.RATE_LIMITED.value, ErrorCode.INTERNAL.value})
# Close codes after which reconnecting cannot help (protocol: "What a client does on close").
FATAL_CLOSE = frozenset({CloseCode.NORMAL, CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG})
# Close codes that say the server is in trouble: the backoff keeps growing even after a healthy session.
TROUBLE_CLOSE = frozenset({CloseCode.INTERNAL_ERROR, CloseCode.TRY_AGAIN_LATER})
# HTTP statuses at the handshake that are worth retrying (besides 5xx).
_RETRY_STATUS = frozenset({408, 429})


def is_offset(value: object) -> bool:
    """True for a JSON integer the protocol accepts as an offset (0 to 2**53-1, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_OFFSET


def follows(last: int, offset: int) -> Literal["next", "duplicate", "gap"]:
    """The one contiguity rule: what ``offset`` is to a topic whose last offset is ``last``."""
    if offset <= last:
        return "duplicate"
    if offset == last + 1:
        return "next"
    return "gap"


def close_stop(code: int | None, reason: str = "") -> ServerClosed | None:
    """The error to stop with after the server closed with ``code`` (None: no close frame), or None to reconnect."""
    if code is not None and code in FATAL_CLOSE:
        return ServerClosed(code, reason)
    return None


def status_retryable(status: int) -> bool:
    """True when a handshake answered with HTTP ``status`` is worth retrying (5xx, 408, 429)."""
    return status >= 500 or status in _RETRY_STATUS or status < 400


# --- items ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reset:
    """The server could not resume ``topic`` from the client's cursor: events may have been lost.

    Yielded by the iterator in the topic's stream, before the events that
    follow it. It happens when the topic's epoch changed (the store lost its
    history, e.g. a memory store restarted), or the cursor was older than the
    retained history, or ahead of the head, or the offset was reused for
    another event (the ``time`` sent with the cursor did not match). The
    application should treat what it built from the topic as possibly
    incomplete and refetch it (e.g. from ``replay.history`` behind an HTTP
    route of the app).

    ``epoch`` is the topic's new epoch; the events that follow have offsets
    ``offset + 1``, ``offset + 2``, ... in it (``replayed`` of them were stored
    before the subscription started). ``previous`` is the cursor the client
    asked to resume from, or None when the server resumed from the identity's
    stored cursor.
    """

    topic: str
    epoch: str
    offset: int
    replayed: int
    previous: Cursor | None

    @property
    def cursor(self) -> Cursor:
        """The position right after this reset: ``Cursor(epoch, offset)``."""
        return Cursor(self.epoch, self.offset)


Item = Event | Reset


# --- state ---------------------------------------------------------------------------


class TopicState:
    """What the rules keep for one topic: the last offset received and the subscribe in flight."""

    __slots__ = ("attempt", "epoch", "live", "name", "offset", "ref", "rewind", "time")

    def __init__(self, name: str, cursor: Cursor | None, rewind: int) -> None:
        self.name = name
        # last offset received (and handed to the application), in `epoch`
        self.epoch: str | None = cursor.epoch if cursor else None
        self.offset = cursor.offset if cursor else 0
        # the `time` of the event at `offset`, when this client received it (protocol: "Reused offsets")
        self.time: int | None = cursor.time if cursor else None
        self.rewind = rewind
        self.ref: str | None = None  # the subscribe in flight on this connection
        self.live = False  # the server confirmed it on this connection: events are accepted
        self.attempt = 0  # refusals in a row that are retried (unavailable, ...)

    def cursor(self) -> Cursor | None:
        """The position to resume from: the last offset received, or None before any."""
        return Cursor(self.epoch, self.offset, self.time) if self.epoch is not None else None


# --- actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send this text frame (through the pacer)."""

    frame: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand this event of ``state`` to the application; the cursor has moved to it."""

    state: TopicState
    event: Event


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The server confirmed ``state``'s subscription; ``reset`` (else None) is the gap to report first.

    ``start`` is the position right before the first event that follows; ``previous`` the
    cursor the client resumed from (None for a fresh subscription).
    """

    state: TopicState
    reset: Reset | None
    start: Cursor
    previous: Cursor | None


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """An ``error`` frame arrived (every one is reported, before what it causes)."""

    error: ServerError


@dataclass(frozen=True, slots=True)
class RetrySubscribe:
    """``state``'s subscribe was refused for now: call :meth:`ClientCore.retry` after ``delay`` seconds."""

    state: TopicState
    delay: float


@dataclass(frozen=True, slots=True)
class Refused:
    """``state``'s subscribe was refused for good (forbidden, bad_request, ...); the topic is dropped."""

    state: TopicState
    error: ServerError


@dataclass(frozen=True, slots=True)
class AckRefused:
    """An ack of ``state`` was not stored (e.g. rate limited): ack again at the next flush."""

    state: TopicState | None
    error: ServerError


@dataclass(frozen=True, slots=True)
class Unmatched:
    """An error that answers no subscribe of ours (``push``: worth raising to an app without ``on_error``)."""

    error: ServerError
    push: bool


Action = Send | Deliver | Confirmed | ErrorReceived | RetrySubscribe | Refused | AckRefused | Unmatched


# --- pacing --------------------------------------------------------------------------


class Pacer:
    """A token bucket for the client's own frames: ``rate`` a second, bursts of ``burst``. Time is given."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._at = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when the frame may go now, else the seconds to wait before asking again."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


# --- the machine ---------------------------------------------------------------------


class ClientCore:
    """The client's per-topic rules. ``topics`` maps a topic to its :class:`TopicState`.

    Feed it server frames with :meth:`receive` (parsed with
    ``protocol.parse_server_frame``); it returns the actions to carry out, in
    order. It keeps the reconnect backoff's count (:meth:`reconnect_delay`).
    """

    def __init__(self, backoff: Backoff, rng: Callable[[], float] = random.random) -> None:
        self.backoff = backoff
        self.rng = rng
        self.topics: dict[str, TopicState] = {}
        self._refs = 0
        self._attempt = 0

    def ref(self, kind: str) -> str:
        """A ref for a frame of ``kind`` (``s`` subscribe, ``a`` ack, ``u`` unsubscribe), never used before."""
        self._refs += 1
        return f"{kind}{self._refs}"

    # --- frames out ------------------------------------------------------------------

    def subscribe(self, state: TopicState) -> Send:
        """The subscribe for ``state``, from its cursor (with the time of the event there), else ``rewind``."""
        ref = self.ref("s")
        state.ref = ref
        state.live = False
        cursor = state.cursor()
        if cursor is None:
            frame = Subscribe(state.name, rewind=state.rewind, ref=ref)
        else:
            frame = Subscribe(state.name, cursor.epoch, cursor.offset, ref=ref, time=state.time)
        return Send(encode_client_frame(frame))

    def connected(self) -> list[Send]:
        """A new connection is open: subscribe every topic again."""
        return [self.subscribe(state) for state in self.topics.values()]

    def disconnected(self) -> None:
        """The connection is gone: nothing is in flight, nothing is live."""
        for state in self.topics.values():
            state.live = False
            state.ref = None

    def retry(self, state: TopicState) -> list[Send]:
        """A :class:`RetrySubscribe` delay passed: subscribe again if ``state`` still waits for it."""
        if self.topics.get(state.name) is state and not state.live and state.ref is None:
            return [self.subscribe(state)]
        return []

    # --- connection ------------------------------------------------------------------

    def reconnect_delay(self, *, healthy: bool, trouble: bool) -> float:
        """The wait before the next connection attempt.

        The count starts again after a session in which the server answered
        (``healthy``), unless it closed saying it is in trouble (1011, 1013).
        """
        if healthy and not trouble:
            self._attempt = 0
        delay = self.backoff.delay(self._attempt, self.rng)
        self._attempt += 1
        return delay

    @property
    def attempt(self) -> int:
        """Reconnect attempts since the last healthy session."""
        return self._attempt

    # --- frames in -------------------------------------------------------------------

    def receive(self, frame: ServerFrame) -> list[Action]:
        """The actions for one server frame. Raises ``ValueError`` for a frame whose fields are ill-typed."""
        if isinstance(frame, EventFrame):
            return self._on_event(frame)
        if isinstance(frame, Subscribed):
            return self._on_subscribed(frame)
        if isinstance(frame, ErrorFrame):
            return self._on_error(frame)
        return []  # ping, pong, unsubscribed: the socket is alive, nothing else to do

    def _on_subscribed(self, frame: Subscribed) -> list[Action]:
        state = self.topics.get(frame.topic)
        if state is None or state.ref is None or frame.ref != state.ref:
            return []  # an answer to a subscribe replaced since, or to none of ours
        epoch, head, replayed = frame.epoch, frame.offset, frame.replayed
        start = head - replayed
        previous = state.cursor()
        gap = frame.resumed and not frame.recovered
        if previous is not None and not gap and (epoch != previous.epoch or start > previous.offset):
            logger.warning(
                "%r: the server resumed at %s/%d, not at our cursor %s/%d: treating it as a reset",
                state.name,
                epoch,
                start,
                previous.epoch,
                previous.offset,
            )
            gap = True
        state.ref = None
        state.live = True
        state.attempt = 0
        reset = None
        if gap:
            reset = Reset(state.name, epoch, start, replayed, previous)
        if gap or previous is None:
            state.epoch, state.offset, state.time = epoch, start, None
        return [Confirmed(state, reset, Cursor(epoch, start), previous)]

    def _on_event(self, frame: EventFrame) -> list[Action]:
        state = self.topics.get(frame.topic)
        if state is None or not state.live or state.epoch is None:
            return []  # not (yet) confirmed on this connection: replayed after the subscribed
        rule = follows(state.offset, frame.offset)
        if rule == "duplicate":
            return []
        if rule == "gap":
            logger.warning("%r: offset %d after %d, resubscribing from there", state.name, frame.offset, state.offset)
            return [self.subscribe(state)]
        data = frame.data
        raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        event = Event(state.name, state.epoch, frame.offset, frame.event, raw, frame.time, data=data)
        state.offset, state.time = frame.offset, frame.time
        return [Deliver(state, event)]

    def _on_error(self, frame: ErrorFrame) -> list[Action]:
        ref = frame.ref
        error = ServerError.from_frame(frame.code, frame.message, frame.topic, ref)
        actions: list[Action] = [ErrorReceived(error)]
        kind = ref[0] if isinstance(ref, str) and ref else ""
        state = self.topics.get(error.topic) if error.topic is not None else None
        if kind == "s" and (state is None or state.ref != ref):
            state = next((s for s in self.topics.values() if s.ref == ref), None)
        if kind == "a":
            actions.append(AckRefused(state, error))
            return actions
        if kind == "u":
            return actions
        if kind == "s":
            if state is None:
                return actions  # a subscribe replaced since
            state.ref = None
            if error.code in RETRYABLE:
                delay = self.backoff.delay(state.attempt, self.rng)
                state.attempt += 1
                actions.append(RetrySubscribe(state, delay))
            else:
                del self.topics[state.name]
                actions.append(Refused(state, error))
            return actions
        # No ref of ours: it answers no frame we sent (every one carries a ref), so nothing is sent again.
        if error.code != ErrorCode.NOT_SUBSCRIBED.value:
            actions.append(Unmatched(error, push=error.code not in RETRYABLE))
        return actions
