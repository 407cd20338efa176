"""What goes over the wire to Redis and back: command packing, replies, live messages.

Pure code, no I/O. ``redis`` (redis-py) is imported lazily.
"""

from __future__ import annotations

import functools
from typing import Any

from ...events import Event

__all__ = [
    "config_value",
    "pack_in_python",
    "packer",
    "parse_entries",
    "parse_payload",
    "redis_errors",
    "text",
    "to_int",
]


def text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def to_int(value: Any) -> int:
    return int(text(value))


@functools.cache
def redis_errors() -> Any:
    """redis-py's exception classes (redis is imported lazily, once)."""
    import redis.exceptions

    return redis.exceptions


def pack_in_python(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (str as UTF-8, bytes as is, numbers as text), in one buffer.

    redis-py's ``pack_command`` re-joins its buffer per argument (21 µs for a
    one-event append here, 195 µs for a batch of 50): this is linear.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif isinstance(arg, float):
            arg = repr(arg).encode("ascii")
        elif not isinstance(arg, bytes):
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


@functools.cache
def packer() -> Any:
    """hiredis's ``pack_command`` (C; the ``redis`` extra installs hiredis), else the same in Python."""
    try:
        from hiredis import pack_command
    except ImportError:
        return pack_in_python
    return pack_command


def config_value(reply: Any) -> str:
    """The value of a one-parameter CONFIG GET reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    else:
        values = list(reply)[1::2]
    return text(values[0]) if values else ""


def parse_entries(topic: str, epoch: str, entries: Any) -> list[Event]:
    """Stream entries (``XRANGE`` replies, ids ``<offset>-0``) as events."""
    events = []
    for entry_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        events.append(
            Event(
                topic,
                epoch,
                to_int(text(entry_id).partition("-")[0]),
                text(values[b"t"] if b"t" in values else values["t"]),
                text(values[b"d"] if b"d" in values else values["d"]),
                to_int(values[b"ms"] if b"ms" in values else values["ms"]),
            )
        )
    return events


def parse_payload(topic: str, payload: bytes) -> list[Event]:
    """A live message that the append script PUBLISHed: ``epoch|first|ms|n|`` then
    ``len:type len:raw`` per event. Raises ``ValueError`` for anything else."""
    epoch_b, first_b, ms_b, n_b, rest = payload.split(b"|", 4)
    epoch, first, ms, n = epoch_b.decode("ascii"), int(first_b), int(ms_b), int(n_b)
    events = []
    pos = 0
    for i in range(n):
        fields = []
        for _ in range(2):
            colon = rest.index(b":", pos)
            size = int(rest[pos:colon])
            if colon + 1 + size > len(rest):
                raise ValueError("truncated payload")
            fields.append(rest[colon + 1 : colon + 1 + size].decode("utf-8"))
            pos = colon + 1 + size
        events.append(Event(topic, epoch, first + i, fields[0], fields[1], ms))
    return events
