"""Event stores: the contract (:mod:`.base`) and one module per backend."""

from __future__ import annotations

from .base import Cursor, EventStore, Health, HealthCheck, LiveSink, Position
from .memory import MemoryStore

__all__ = ["Cursor", "EventStore", "Health", "HealthCheck", "LiveSink", "MemoryStore", "Position"]
