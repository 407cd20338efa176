"""A burst of back-to-back publishes from one task is not a slow consumer.

MemoryStore appends never waited on anything, so a loop of ``await
replay.publish(...)`` never let the connections' writers run: every live frame
of the burst piled up in each send queue, and a burst longer than
``send_queue_size`` closed every subscriber with 1013 although all of them read
promptly (found by the fan-out benchmark, bench/).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

from starlette_replay import MemoryStore, Replay, allow_all

pytestmark = pytest.mark.anyio

SEND_QUEUE = 4
BURST = 40


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = ASGIWebSocketTransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


async def test_back_to_back_publishes_do_not_close_a_prompt_reader() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=SEND_QUEUE)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    async with running(app) as client:
        async with aconnect_ws("/ws", client, keepalive_ping_interval_seconds=None) as ws:
            with anyio.fail_after(10):
                await ws.send_text(json.dumps({"type": "subscribe", "topic": "burst"}))
                assert json.loads(await ws.receive_text())["type"] == "subscribed"
                for i in range(BURST):
                    await replay.publish("burst", "tick", {"i": i})
                offsets = []
                for _ in range(BURST):
                    frame: dict[str, Any] = json.loads(await ws.receive_text())
                    offsets.append(frame["offset"])
                assert offsets == list(range(1, BURST + 1))
                # Still open: the ping is answered, no 1013 close comes instead.
                await ws.send_text(json.dumps({"type": "ping", "ref": "after"}))
                assert json.loads(await ws.receive_text()) == {"type": "pong", "ref": "after"}
