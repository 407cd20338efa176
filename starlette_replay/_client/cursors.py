"""Where a client keeps its processed cursors across process restarts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread

from ..stores.base import Cursor

__all__ = ["CursorStore", "FileCursorStore", "MemoryCursorStore"]

logger = logging.getLogger("starlette_replay.client")


@runtime_checkable
class CursorStore(Protocol):
    """Where a client keeps its processed cursors across process restarts.

    ``load`` is called once per topic when the client subscribes to it without
    an explicit cursor; ``save`` with the cursors that moved since the last
    save, at the same batched points as acks and when the client closes. An
    exception from ``save`` is logged and the save retried at the next flush;
    one from ``load`` propagates to the caller of ``subscribe`` (or ``async with``).
    """

    async def load(self, topic: str) -> Cursor | None:
        """The saved cursor of ``topic``, or None."""
        ...

    async def save(self, cursors: Mapping[str, Cursor]) -> None:
        """Persist ``cursors`` (topic -> cursor); topics not named keep their saved cursor."""
        ...


class MemoryCursorStore:
    """A :class:`CursorStore` in a dict (``cursors``): for tests, or to share cursors between clients of one process."""

    def __init__(self, cursors: Mapping[str, Cursor] | None = None) -> None:
        self.cursors: dict[str, Cursor] = dict(cursors or {})
        self.saves = 0

    async def load(self, topic: str) -> Cursor | None:
        """The saved cursor of ``topic``, or None. Safe to cancel."""
        return self.cursors.get(topic)

    async def save(self, cursors: Mapping[str, Cursor]) -> None:
        """Update the dict. Safe to cancel."""
        self.cursors.update(cursors)
        self.saves += 1


class FileCursorStore:
    """A :class:`CursorStore` in one JSON file, replaced atomically (written aside, fsynced, renamed).

    The file maps each topic to ``[epoch, offset]``. One client per file: two
    clients saving to the same file would overwrite each other's topics.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cursors: dict[str, Cursor] | None = None
        self._lock = anyio.Lock()

    def _read(self) -> dict[str, Cursor]:
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {}
        cursors: dict[str, Cursor] = {}
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path}: expected a JSON object of topic -> [epoch, offset(, time)]")
        for topic, value in raw.items():
            if (
                isinstance(value, list)
                and len(value) in (2, 3)
                and isinstance(value[0], str)
                and all(isinstance(n, int) and not isinstance(n, bool) for n in value[1:])
            ):
                cursors[topic] = Cursor(value[0], value[1], value[2] if len(value) == 3 else None)
            else:
                logger.warning("%s: ignoring the malformed cursor of %r", self.path, topic)
        return cursors

    def _write(self, cursors: dict[str, Cursor]) -> None:
        text = json.dumps(
            {
                topic: [c.epoch, c.offset] if c.time is None else [c.epoch, c.offset, c.time]
                for topic, c in sorted(cursors.items())
            },
            ensure_ascii=False,
        )
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)

    async def _all(self) -> dict[str, Cursor]:
        if self._cursors is None:
            self._cursors = await anyio.to_thread.run_sync(self._read)
        return self._cursors

    async def load(self, topic: str) -> Cursor | None:
        """The saved cursor of ``topic``, or None. Raises ``OSError``/``ValueError`` for an unreadable file.

        Safe to cancel (the file is read once, in a worker thread).
        """
        return (await self._all()).get(topic)

    async def save(self, cursors: Mapping[str, Cursor]) -> None:
        """Merge ``cursors`` into the file. Raises ``OSError``. Cancelling may leave the file as it was."""
        async with self._lock:
            merged = dict(await self._all())
            merged.update(cursors)
            await anyio.to_thread.run_sync(self._write, merged)
            self._cursors = merged
