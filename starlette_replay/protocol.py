"""The wire protocol, version 1, as pure code: no awaits, no I/O.

Client frames are parsed into typed objects, or a :class:`FrameError` that says
which field is wrong and why. Server frames are encoded to the JSON text that
goes on the socket; an event's frame is encoded once and cached on the event, so
every subscriber gets the same string.

The contract is ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import InvalidEvent, InvalidTopic
from .events import Event

__all__ = [
    "MAX_CURSOR_LIST_LENGTH",
    "MAX_EPOCH_LENGTH",
    "MAX_OFFSET",
    "MAX_REF_LENGTH",
    "MAX_SSE_EPOCH_LENGTH",
    "SSE_PING",
    "SUBPROTOCOL",
    "Ack",
    "ClientFrame",
    "CloseCode",
    "ErrorCode",
    "ErrorFrame",
    "EventFrame",
    "FrameError",
    "Ping",
    "Pong",
    "Ref",
    "ServerFrame",
    "ServerPing",
    "StreamRequest",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "check_event_type",
    "check_topic",
    "cursor_list_fits",
    "encode_client_frame",
    "encode_cursor_entry",
    "encode_data",
    "encode_error",
    "encode_event",
    "encode_ping",
    "encode_pong",
    "encode_sse_message",
    "encode_sse_retry",
    "encode_subscribed",
    "encode_unsubscribed",
    "is_valid_topic",
    "parse_client_frame",
    "parse_cursor_list",
    "parse_server_frame",
    "parse_stream_request",
]

SUBPROTOCOL = "replay.v1"
MAX_OFFSET = 2**53 - 1
MAX_REF_LENGTH = 64
# Epochs are opaque to clients; ours are 16 hex chars. The bound only keeps a
# hostile client from making us compare megabytes.
MAX_EPOCH_LENGTH = 128
MAX_TOPIC_LENGTH = 256
MAX_EVENT_TYPE_LENGTH = 64

_TOPIC_RE = re.compile(r"[A-Za-z0-9_\-.:@/]{1,256}")
_EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_\-.:@/]{1,64}")

Ref = str | int


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses, and what a client does on each."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class ErrorCode(str, enum.Enum):  # noqa: UP042 - StrEnum would change str() of a code
    """Codes carried by ``error`` frames."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    NOT_SUBSCRIBED = "not_subscribed"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


class FrameError(Exception):
    """A client frame was refused. Becomes an ``error`` frame; the connection stays open."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        ref: Ref | None = None,
        topic: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.topic = topic

    def __repr__(self) -> str:
        return f"FrameError({self.code.value!r}, {self.message!r}, ref={self.ref!r}, topic={self.topic!r})"

    def encode(self) -> str:
        """The ``error`` frame for this refusal."""
        return encode_error(self.code, self.message, topic=self.topic, ref=self.ref)


# --- names -------------------------------------------------------------------------


def is_valid_topic(topic: object) -> bool:
    """True when ``topic`` is a string the protocol accepts as a topic name."""
    return isinstance(topic, str) and _TOPIC_RE.fullmatch(topic) is not None


def check_topic(topic: object) -> str:
    """Return ``topic`` unchanged, or raise :class:`InvalidTopic` saying what is wrong."""
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a string, not {type(topic).__name__}")
    if _TOPIC_RE.fullmatch(topic) is None:
        raise InvalidTopic(f"invalid topic {topic[:80]!r}: 1-{MAX_TOPIC_LENGTH} characters of A-Z a-z 0-9 _ - . : @ /")
    return topic


def check_event_type(event_type: object) -> str:
    """Return ``event_type`` unchanged, or raise :class:`InvalidEvent` saying what is wrong."""
    if not isinstance(event_type, str):
        raise InvalidEvent(f"event type must be a string, not {type(event_type).__name__}")
    if _EVENT_TYPE_RE.fullmatch(event_type) is None:
        raise InvalidEvent(
            f"invalid event type {event_type[:80]!r}: 1-{MAX_EVENT_TYPE_LENGTH} characters of A-Z a-z 0-9 _ - . : @ /"
        )
    return event_type


# json.dumps with options builds an encoder per call; this one is built once
_DATA_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_data(data: Any) -> str:
    """Encode an event payload to compact JSON text, or raise :class:`InvalidEvent`.

    NaN and infinities are refused (they are not JSON), and so are strings with
    lone surrogates (they cannot be sent as UTF-8).
    """
    try:
        raw = _DATA_ENCODER.encode(data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(f"data is not JSON-serialisable: {exc}") from None
    if not raw.isascii():
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEvent("data contains a lone surrogate, which is not valid UTF-8") from None
    return raw


# --- client frames -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str
    epoch: str | None = None
    offset: int | None = None
    rewind: int = 0
    ref: Ref | None = None
    # The `time` of the event at `offset` as the client received it ("Reused offsets"): the
    # server compares it with the stored event's to tell a reused offset from a recovered one.
    time: int | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    topic: str
    epoch: str
    offset: int
    ref: Ref | None = None
    # The `time` of the acked event; the server fills it from its store when absent.
    time: int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref | None = None


ClientFrame = Subscribe | Unsubscribe | Ack | Ping


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _bad(message: str, ref: Ref | None = None, topic: str | None = None) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, message, ref=ref, topic=topic)


def _is_utf8(text: str) -> bool:
    # A JSON escape such as "\ud800" yields a lone surrogate: echoed, it would make a
    # frame that no socket can send as UTF-8.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_ref(obj: dict[str, Any]) -> Ref | None:
    if "ref" not in obj:
        return None
    ref = obj["ref"]
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise _bad("'ref' must be a string or an integer")
    if len(str(ref)) > MAX_REF_LENGTH:
        raise _bad(f"'ref' must be at most {MAX_REF_LENGTH} characters")
    if isinstance(ref, str) and not _is_utf8(ref):
        raise _bad("'ref' must be valid Unicode (no lone surrogates)")
    return ref


def _field_topic(obj: dict[str, Any], ref: Ref | None) -> str:
    if "topic" not in obj:
        raise _bad("missing field 'topic'", ref)
    topic = obj["topic"]
    if not isinstance(topic, str):
        raise _bad("'topic' must be a string", ref)
    if _TOPIC_RE.fullmatch(topic) is None:
        raise _bad(
            f"'topic' must be 1-{MAX_TOPIC_LENGTH} characters of A-Z a-z 0-9 _ - . : @ /",
            ref,
        )
    return topic


def _field_int(obj: dict[str, Any], name: str, ref: Ref | None, topic: str) -> int:
    value = obj[name]
    # bool is an int subclass in Python, but `true` is not a JSON integer.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", ref, topic)
    if not 0 <= value <= MAX_OFFSET:
        raise _bad(f"'{name}' must be between 0 and {MAX_OFFSET}", ref, topic)
    return value


def _field_epoch(obj: dict[str, Any], ref: Ref | None, topic: str) -> str:
    epoch = obj["epoch"]
    if not isinstance(epoch, str) or not epoch:
        raise _bad("'epoch' must be a non-empty string", ref, topic)
    if len(epoch) > MAX_EPOCH_LENGTH:
        raise _bad(f"'epoch' must be at most {MAX_EPOCH_LENGTH} characters", ref, topic)
    if not _is_utf8(epoch):
        raise _bad("'epoch' must be valid Unicode (no lone surrogates)", ref, topic)
    return epoch


def parse_client_frame(text: str) -> ClientFrame:
    """Parse one client text frame.

    Returns a :data:`ClientFrame`. Raises :class:`FrameError` (``bad_request``) with
    a message naming the field at fault; its ``ref`` is the frame's own ``ref``
    when that could be read, so the error can be matched to the request.
    """
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _bad("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _bad("frame must be a JSON object")
    ref = _parse_ref(obj)
    kind = obj.get("type")
    if kind is None:
        raise _bad("missing field 'type'", ref)
    if kind == "subscribe":
        topic = _field_topic(obj, ref)
        has_epoch, has_offset = "epoch" in obj, "offset" in obj
        if has_epoch != has_offset:
            raise _bad("'epoch' and 'offset' must be given together", ref, topic)
        epoch = _field_epoch(obj, ref, topic) if has_epoch else None
        offset = _field_int(obj, "offset", ref, topic) if has_offset else None
        rewind = _field_int(obj, "rewind", ref, topic) if "rewind" in obj else 0
        stamp = None
        if "time" in obj:
            if not has_epoch:
                raise _bad("'time' needs 'epoch' and 'offset'", ref, topic)
            stamp = _field_int(obj, "time", ref, topic)
        return Subscribe(topic, epoch, offset, rewind, ref, stamp)
    if kind == "unsubscribe":
        return Unsubscribe(_field_topic(obj, ref), ref)
    if kind == "ack":
        topic = _field_topic(obj, ref)
        for name in ("epoch", "offset"):
            if name not in obj:
                raise _bad(f"missing field '{name}'", ref, topic)
        stamp = _field_int(obj, "time", ref, topic) if "time" in obj else None
        return Ack(topic, _field_epoch(obj, ref, topic), _field_int(obj, "offset", ref, topic), ref, stamp)
    if kind == "ping":
        return Ping(ref)
    if isinstance(kind, str):
        raise _bad(f"unknown frame type {kind[:64]!r}", ref)
    raise _bad("'type' must be a string", ref)


def encode_client_frame(frame: ClientFrame) -> str:
    """Encode a client frame (what a client sends). Fields left at None are omitted."""
    obj: dict[str, Any]
    if isinstance(frame, Subscribe):
        obj = {"type": "subscribe", "topic": frame.topic}
        if frame.epoch is not None and frame.offset is not None:
            obj["epoch"] = frame.epoch
            obj["offset"] = frame.offset
            if frame.time is not None:
                obj["time"] = frame.time
        if frame.rewind:
            obj["rewind"] = frame.rewind
    elif isinstance(frame, Unsubscribe):
        obj = {"type": "unsubscribe", "topic": frame.topic}
    elif isinstance(frame, Ack):
        obj = {"type": "ack", "topic": frame.topic, "epoch": frame.epoch, "offset": frame.offset}
        if frame.time is not None:
            obj["time"] = frame.time
    else:
        obj = {"type": "ping"}
    if frame.ref is not None:
        obj["ref"] = frame.ref
    return _dumps(obj)


# --- server frames -------------------------------------------------------------------


_FRAME_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(obj: dict[str, Any]) -> str:
    return _FRAME_ENCODER.encode(obj)


def _with_ref(obj: dict[str, Any], ref: Ref | None) -> dict[str, Any]:
    if ref is not None:
        obj["ref"] = ref
    return obj


def encode_subscribed(
    topic: str,
    epoch: str,
    offset: int,
    *,
    resumed: bool,
    recovered: bool,
    replayed: int,
    ref: Ref | None = None,
) -> str:
    return _dumps(
        _with_ref(
            {
                "type": "subscribed",
                "topic": topic,
                "epoch": epoch,
                "offset": offset,
                "resumed": resumed,
                "recovered": recovered,
                "replayed": replayed,
            },
            ref,
        )
    )


def encode_event(event: Event) -> str:
    """The ``event`` frame for ``event``, encoded once and cached on it.

    Topic and event type are checked against an alphabet without quotes or
    backslashes before they are stored, and ``raw`` is JSON text already, so the
    frame is assembled without a JSON encoder.
    """
    frame = event._frame
    if frame is None:
        frame = (
            f'{{"type":"event","topic":"{event.topic}","offset":{event.offset},'
            f'"event":"{event.event}","data":{event.raw},"time":{event.time}}}'
        )
        event._frame = frame
    return frame


def encode_unsubscribed(topic: str, ref: Ref | None = None) -> str:
    return _dumps(_with_ref({"type": "unsubscribed", "topic": topic}, ref))


def encode_pong(ref: Ref | None = None) -> str:
    return _dumps(_with_ref({"type": "pong"}, ref))


_PING = '{"type":"ping"}'


def encode_ping() -> str:
    return _PING


def encode_error(
    code: ErrorCode,
    message: str,
    *,
    topic: str | None = None,
    ref: Ref | None = None,
) -> str:
    obj: dict[str, Any] = {"type": "error", "code": code.value, "message": message}
    if topic is not None:
        obj["topic"] = topic
    return _dumps(_with_ref(obj, ref))


# --- server frames, parsed (for clients and tests) ----------------------------------


@dataclass(frozen=True, slots=True)
class Subscribed:
    topic: str
    epoch: str
    offset: int
    resumed: bool
    recovered: bool
    replayed: int
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class EventFrame:
    topic: str
    offset: int
    event: str
    data: Any
    time: int


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    topic: str
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class ServerPing:
    pass


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    code: str
    message: str
    topic: str | None = None
    ref: Ref | None = None


ServerFrame = Subscribed | EventFrame | Unsubscribed | Pong | ServerPing | ErrorFrame


def _server_field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj[name]
    # bool is an int subclass in Python, but `true` is not a JSON integer.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{obj.get('type')} frame: {name!r} has the wrong type ({type(value).__name__})")
    return value


def _server_offset(obj: dict[str, Any], name: str) -> int:
    value = _server_field(obj, name, int)
    if not 0 <= value <= MAX_OFFSET:
        raise ValueError(f"{obj.get('type')} frame: {name!r} out of range ({value})")
    return int(value)


def _server_ref(obj: dict[str, Any]) -> Ref | None:
    ref = obj.get("ref")
    if ref is None or (isinstance(ref, str | int) and not isinstance(ref, bool)):
        return ref
    raise ValueError(f"{obj.get('type')} frame: 'ref' has the wrong type ({type(ref).__name__})")


def parse_server_frame(text: str | bytes) -> ServerFrame:
    """Parse one server frame (what a client receives).

    Raises ``ValueError`` when the text is not a frame of this protocol: not
    JSON, an unknown type, a missing field, or a field of the wrong type (an
    offset that is not an integer from 0 to 2**53-1, an empty epoch,
    ``replayed`` above ``offset``, ...).
    """
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("server frame must be a JSON object")
    kind = obj.get("type")
    try:
        if kind == "event":
            return EventFrame(
                _server_field(obj, "topic", str),
                _server_offset(obj, "offset"),
                _server_field(obj, "event", str),
                obj.get("data"),
                _server_field(obj, "time", int),
            )
        if kind == "subscribed":
            epoch = _server_field(obj, "epoch", str)
            if not epoch:
                raise ValueError("subscribed frame: empty 'epoch'")
            offset, replayed = _server_offset(obj, "offset"), _server_offset(obj, "replayed")
            if replayed > offset:
                raise ValueError(f"subscribed frame: 'replayed' ({replayed}) above 'offset' ({offset})")
            return Subscribed(
                _server_field(obj, "topic", str),
                epoch,
                offset,
                _server_field(obj, "resumed", bool),
                _server_field(obj, "recovered", bool),
                replayed,
                _server_ref(obj),
            )
        if kind == "unsubscribed":
            return Unsubscribed(_server_field(obj, "topic", str), _server_ref(obj))
        if kind == "pong":
            return Pong(_server_ref(obj))
        if kind == "ping":
            return ServerPing()
        if kind == "error":
            topic = obj.get("topic")
            if topic is not None and not isinstance(topic, str):
                raise ValueError("error frame: 'topic' has the wrong type")
            return ErrorFrame(
                _server_field(obj, "code", str), _server_field(obj, "message", str), topic, _server_ref(obj)
            )
    except KeyError as exc:
        raise ValueError(f"{kind} frame without field {exc}") from None
    raise ValueError(f"unknown server frame type {kind!r}")


# --- server-sent events: the same frames over text/event-stream ------------------------

# The cursor list (Last-Event-ID, the last_event_id parameter, every id: line) is bounded so
# that a browser stores it and a server reads it without effort: its epochs are shorter than
# a frame's, and the whole value has a cap.
MAX_SSE_EPOCH_LENGTH = 64
MAX_CURSOR_LIST_LENGTH = 8192

_CURSOR_ENTRY_RE = re.compile(r"([^,:\s]{1,64}):(0|[1-9][0-9]{0,15})(?::(0|[1-9][0-9]{0,15}))?")
_COUNT_RE = re.compile(r"0|[1-9][0-9]{0,15}")

SSE_PING = ": ping\n\n"


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """An SSE request, parsed: one :class:`Subscribe` per topic, in request order."""

    subscribes: list[Subscribe]

    @property
    def topics(self) -> list[str]:
        return [sub.topic for sub in self.subscribes]


def _sse_count(value: str, name: str) -> int:
    if _COUNT_RE.fullmatch(value) is None or int(value) > MAX_OFFSET:
        raise _bad(f"{name} must be an integer between 0 and {MAX_OFFSET}, not {value[:32]!r}")
    return int(value)


def parse_cursor_list(value: str, count: int) -> list[tuple[str, int, int | None] | None]:
    """Parse a cursor list for ``count`` topics: one ``(epoch, offset, time)`` or None (no cursor) per topic.

    An entry is ``epoch:offset``, ``epoch:offset:time`` or empty; entries are
    joined by ``,``. Raises :class:`FrameError` (``bad_request``) naming what is
    wrong: a list longer than ``MAX_CURSOR_LIST_LENGTH``, another number of
    entries than topics, an entry that does not parse (an epoch with ``:`` or
    ``,``, over ``MAX_SSE_EPOCH_LENGTH`` characters; an offset or time that is
    not an integer from 0 to 2^53-1).
    """
    if len(value) > MAX_CURSOR_LIST_LENGTH:
        raise _bad(f"the cursor list must be at most {MAX_CURSOR_LIST_LENGTH} characters")
    entries = value.split(",")
    if len(entries) != count:
        raise _bad(f"the cursor list has {len(entries)} entries for {count} topics (one per topic, joined by ',')")
    cursors: list[tuple[str, int, int | None] | None] = []
    for index, entry in enumerate(entries):
        if not entry:
            cursors.append(None)
            continue
        match = _CURSOR_ENTRY_RE.fullmatch(entry)
        if match is None:
            raise _bad(
                f"cursor entry {index + 1} must be empty, epoch:offset or epoch:offset:time "
                f"(an epoch of 1-{MAX_SSE_EPOCH_LENGTH} characters without ':' or ','), not {entry[:80]!r}"
            )
        epoch, offset, time = match.groups()
        if int(offset) > MAX_OFFSET or (time is not None and int(time) > MAX_OFFSET):
            raise _bad(f"cursor entry {index + 1}: offset and time must be at most {MAX_OFFSET}")
        cursors.append((epoch, int(offset), None if time is None else int(time)))
    return cursors


def parse_stream_request(
    topics: list[str],
    rewinds: list[str],
    cursor_list: str | None,
    *,
    max_subscriptions: int,
) -> StreamRequest:
    """Parse an SSE request: its ``topic`` parameters, its ``rewind`` parameters and its cursor list.

    ``cursor_list`` is the ``Last-Event-ID`` header, or else the
    ``last_event_id`` parameter (None when neither was sent; an empty value
    means no cursor for any topic). Returns a :class:`StreamRequest`. Raises
    :class:`FrameError`: ``too_many_subscriptions`` past ``max_subscriptions``
    topics, ``bad_request`` for no topic, a bad or repeated topic, a bad or
    repeated ``rewind`` and a cursor list that does not parse.
    """
    if not topics:
        raise _bad("no topic: name one or more with ?topic=...")
    if len(topics) > max_subscriptions:
        raise FrameError(
            ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {max_subscriptions} topics per stream, not {len(topics)}"
        )
    seen: set[str] = set()
    for topic in topics:
        if _TOPIC_RE.fullmatch(topic) is None:
            raise _bad(f"topic {topic[:80]!r} must be 1-{MAX_TOPIC_LENGTH} characters of A-Z a-z 0-9 _ - . : @ /")
        if topic in seen:
            raise _bad(f"topic {topic!r} is named more than once", topic=topic)
        seen.add(topic)
    if len(rewinds) > 1:
        raise _bad("rewind is given more than once")
    rewind = _sse_count(rewinds[0], "rewind") if rewinds else 0
    cursors = parse_cursor_list(cursor_list, len(topics)) if cursor_list else [None] * len(topics)
    subscribes: list[Subscribe] = []
    for topic, cursor in zip(topics, cursors, strict=True):
        if cursor is None:
            subscribes.append(Subscribe(topic, rewind=rewind))
        else:
            epoch, offset, time = cursor
            subscribes.append(Subscribe(topic, epoch, offset, rewind, time=time))
    return StreamRequest(subscribes)


def cursor_list_fits(epochs: list[str]) -> bool:
    """Whether every cursor list a stream of topics in these epochs can write stays within ``MAX_CURSOR_LIST_LENGTH``.

    Counts the longest entries possible (offsets and times of 16 digits): a
    stream must never write an ``id:`` that its own reconnect would be refused
    for.
    """
    digits = len(str(MAX_OFFSET))
    return sum(len(epoch) + 2 + 2 * digits for epoch in epochs) + len(epochs) - 1 <= MAX_CURSOR_LIST_LENGTH


def encode_cursor_entry(epoch: str, offset: int, time: int | None = None) -> str:
    """One entry of a cursor list: ``epoch:offset`` or ``epoch:offset:time``."""
    return f"{epoch}:{offset}" if time is None else f"{epoch}:{offset}:{time}"


def encode_sse_message(data: str, event_id: str | None = None) -> str:
    """One SSE message: an optional ``id:`` line, one ``data:`` line (a JSON frame: no line breaks), a blank line."""
    if event_id is None:
        return f"data: {data}\n\n"
    return f"id: {event_id}\ndata: {data}\n\n"


def encode_sse_retry(milliseconds: int) -> str:
    """The ``retry:`` line a stream opens with: how long ``EventSource`` waits before reconnecting."""
    return f"retry: {milliseconds}\n\n"
