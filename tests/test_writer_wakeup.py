"""The writer's wake-up: a bare asyncio future on asyncio, anyio.Event elsewhere.

Each event below is published only after the client received the previous one,
so the writer is idle (waiting on its wake-up) every time a frame is pushed.
Both paths must deliver every frame, in order, and still close on demand.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from starlette_replay import MemoryStore, Replay, allow_all
from starlette_replay import connection as connection_module
from starlette_replay.protocol import CloseCode

from .helpers import connect, make_app, running

pytestmark = pytest.mark.anyio

EVENTS = 20


async def test_asyncio_fast_path_is_taken_on_asyncio() -> None:
    assert connection_module._asyncio_loop() is asyncio.get_running_loop()


@pytest.mark.parametrize("fast_path", [True, False], ids=["future", "anyio-event"])
async def test_idle_writer_wakes_for_every_frame(fast_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not fast_path:
        monkeypatch.setattr(connection_module, "_asyncio_loop", lambda: None)
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as client:
        with anyio.fail_after(10):
            await client.subscribe("t")
            for i in range(EVENTS):
                await replay.publish("t", "tick", {"i": i})
                [event] = await client.events(1)
                assert (event["offset"], event["data"]) == (i + 1, {"i": i})
            await client.nothing_pending()
            # Abort while the writer waits: the connection's one task group stops both tasks.
            [conn] = list(replay._connections)
            conn.abort(CloseCode.TRY_AGAIN_LATER, "test")
            assert await client.closed() == CloseCode.TRY_AGAIN_LATER


async def test_long_replay_through_a_queue_that_never_empties() -> None:
    # 1,200 replayed events: pages of 500 keep the send queue from emptying, so the
    # writer drops sent frames from its front (every 256) while it goes on.
    total = 1200
    replay = Replay(MemoryStore(), authorize=allow_all, replay_page_size=500)
    async with running(make_app(replay)) as app, connect(app) as client:
        with anyio.fail_after(20):
            for i in range(total):
                await replay.publish("t", "tick", {"i": i})
            reply = await client.subscribe("t", rewind=total)
            assert reply["replayed"] == total
            events = await client.events(total, within=20)
            assert [e["offset"] for e in events] == list(range(1, total + 1))
            assert [e["data"]["i"] for e in events] == list(range(total))
            await replay.publish("t", "tick", {"i": total})
            [live] = await client.events(1)
            assert live["offset"] == total + 1
            await client.nothing_pending()
            [conn] = list(replay._connections)
            assert conn.queued == 0
            assert len(conn._queue) <= 1  # emptied once the writer caught up (the pong may be in flight)
