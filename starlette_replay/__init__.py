"""starlette_replay: lossless realtime pushes over WebSockets for Starlette and FastAPI.

Every event is stored first, delivered live to whoever is connected, and replayed
from a client's cursor when it reconnects: no gap, no duplicate, in order.
"""

from __future__ import annotations

from .errors import (
    InvalidEvent,
    InvalidTopic,
    NotRunning,
    Refused,
    ReplayError,
    StoreError,
    StoreUnavailable,
)
from .events import Event
from .protocol import CloseCode, ErrorCode
from .publisher import Publisher
from .replay import Replay, Snapshot, allow_all
from .stores.base import Cursor, EventStore, Health, Position
from .stores.memory import MemoryStore
from .stores.redis import RedisStore

__all__ = [
    "CloseCode",
    "Cursor",
    "ErrorCode",
    "Event",
    "EventStore",
    "Health",
    "InvalidEvent",
    "InvalidTopic",
    "MemoryStore",
    "NotRunning",
    "Position",
    "Publisher",
    "RedisStore",
    "Refused",
    "Replay",
    "ReplayError",
    "Snapshot",
    "StoreError",
    "StoreUnavailable",
    "allow_all",
]

__version__ = "0.1.0"
