from __future__ import annotations

import json

import pytest

from starlette_replay import MemoryStore, Replay, allow_all

pytestmark = pytest.mark.anyio


async def test_publish_then_history() -> None:
    async with Replay(MemoryStore(), authorize=allow_all) as replay:
        event = await replay.publish("t", "greeting", {"text": "hi"})
        assert (event.offset, event.data) == (1, {"text": "hi"})
        (stored,) = await replay.history("t")
        assert stored == event
        assert json.loads(stored.raw) == {"text": "hi"}
