"""A store whose ``connect()`` runs a task group (as a networked store's listener does).

``Replay.aclose`` must exit the store's context with the task group's cancel
scope innermost: exiting it inside a fresh shielding scope raised
"Attempted to exit a cancel scope that isn't the current task's current cancel
scope" on every shutdown with such a store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from starlette_replay import MemoryStore, Replay
from starlette_replay.stores.base import LiveSink

pytestmark = pytest.mark.anyio


class TaskGroupStore(MemoryStore):
    """A MemoryStore with a background task for as long as it is connected."""

    def __init__(self) -> None:
        super().__init__()
        self.background_started = anyio.Event()
        self.background_ended = anyio.Event()
        self.closed = False

    async def _background(self) -> None:
        self.background_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.background_ended.set()

    @asynccontextmanager
    async def connect(self, sink: LiveSink) -> AsyncIterator[None]:
        async with super().connect(sink), anyio.create_task_group() as tg:
            tg.start_soon(self._background)
            yield
            tg.cancel_scope.cancel()

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


async def test_close_a_store_that_runs_a_task_group() -> None:
    store = TaskGroupStore()
    async with Replay(store) as replay:
        with anyio.fail_after(5):
            await store.background_started.wait()
        await replay.publish("t", "e", 1)
    assert store.background_ended.is_set()
    assert store.closed
    assert not replay.running


async def test_close_under_cancellation_still_closes_the_store() -> None:
    store = TaskGroupStore()
    replay = Replay(store)
    with anyio.CancelScope() as scope:
        async with replay:
            with anyio.fail_after(5):
                await store.background_started.wait()
            scope.cancel()
            await anyio.sleep_forever()  # cancelled at once: the Replay closes while cancelled
    assert scope.cancelled_caught
    assert store.background_ended.is_set()
    assert store.closed
    assert not replay.running
