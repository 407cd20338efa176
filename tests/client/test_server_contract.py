"""Server behaviour the client relies on, checked against the real server over real sockets."""

from __future__ import annotations

import json

import anyio
import pytest
from websockets.asyncio.client import connect

from starlette_replay import MemoryStore, Replay, allow_all

from .helpers import TIMEOUT, replay_app, serve, url

pytestmark = pytest.mark.anyio


async def test_rate_limited_error_echoes_the_ref_of_the_dropped_frame() -> None:
    """protocol.md: the server echoes a frame's ref "on the reply or error for that frame"; a client
    can only send again the frame that was dropped if the rate_limited error says which one it was."""
    replay = Replay(MemoryStore(), authorize=allow_all, max_frame_rate=1, frame_burst=2)
    async with serve(replay_app(replay)) as port, connect(url(port), subprotocols=["replay.v1"]) as ws:  # type: ignore[list-item]
        with anyio.fail_after(TIMEOUT):
            await ws.send(json.dumps({"type": "ping", "ref": "p1"}))
            await ws.send(json.dumps({"type": "ping", "ref": "p2"}))
            await ws.send(json.dumps({"type": "subscribe", "topic": "t", "ref": "s3"}))
            await ws.send(json.dumps({"type": "ping"}))
            replies = [json.loads(await ws.recv()) for _ in range(4)]
    assert [(r["type"], r.get("ref")) for r in replies[:2]] == [("pong", "p1"), ("pong", "p2")]
    assert [(r["type"], r["code"], r.get("ref"), r.get("topic")) for r in replies[2:]] == [
        ("error", "rate_limited", "s3", "t"),
        ("error", "rate_limited", None, None),
    ]
    assert "ref" not in replies[3]
