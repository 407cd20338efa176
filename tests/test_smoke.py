from __future__ import annotations

import json

import pytest

from starlette_replay import MemoryStore, NotRunning, Replay, allow_all

pytestmark = pytest.mark.anyio


async def test_publish_then_history() -> None:
    async with Replay(MemoryStore(), authorize=allow_all) as replay:
        event = await replay.publish("t", "greeting", {"text": "hi"})
        assert (event.offset, event.data) == (1, {"text": "hi"})
        (stored,) = await replay.history("t")
        assert stored == event
        assert json.loads(stored.raw) == {"text": "hi"}


async def test_position_gives_a_snapshot_cursor() -> None:
    async with Replay(MemoryStore(history_size=2), authorize=allow_all) as replay:
        fresh = await replay.position("snap")
        assert (fresh.head, fresh.oldest) == (0, 1)
        events = await replay.publish_many("snap", [("a", 1), ("a", 2), ("a", 3)])
        position = await replay.position("snap")
        assert (position.epoch, position.head, position.oldest) == (fresh.epoch, 3, 2)
        assert [e.offset for e in await replay.history("snap")] == [2, 3]
        assert events[-1].offset == position.head
    with pytest.raises(NotRunning):
        await replay.position("snap")
