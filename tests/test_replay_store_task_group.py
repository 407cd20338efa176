"""A store whose connect() owns a task group (as RedisStore's does) must start and stop cleanly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from starlette_replay import MemoryStore, Replay, allow_all
from starlette_replay.stores.base import LiveSink

pytestmark = pytest.mark.anyio


class TaskGroupStore(MemoryStore):
    """A MemoryStore whose connect() runs background work in a task group."""

    def __init__(self) -> None:
        super().__init__()
        self.background_ran = anyio.Event()
        self.background_stopped = False

    @asynccontextmanager
    async def connect(self, sink: LiveSink) -> AsyncIterator[None]:
        async with super().connect(sink), anyio.create_task_group() as tg:
            tg.start_soon(self._background)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _background(self) -> None:
        self.background_ran.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.background_stopped = True


async def test_replay_stops_a_store_that_owns_a_task_group() -> None:
    store = TaskGroupStore()
    async with Replay(store, authorize=allow_all) as replay:
        with anyio.fail_after(5):
            await store.background_ran.wait()
        assert (await replay.publish("t", "e", 1)).offset == 1
    assert store.background_stopped
