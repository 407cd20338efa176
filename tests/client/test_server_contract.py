"""Server behaviour the client relies on, checked against the real server over real sockets."""

from __future__ import annotations

import json

import anyio
import pytest
from websockets.asyncio.client import connect

from starlette_replay import Event, MemoryStore, Replay, allow_all
from starlette_replay.client import Backoff, RateLimitedError, ReplayClient, ServerError

from .helpers import TIMEOUT, replay_app, serve, take, url

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


async def test_the_client_paces_its_frames_under_the_server_limit() -> None:
    """Twelve subscribes at once against a server that allows bursts of 3: paced, none is refused."""
    errors: list[ServerError] = []
    replay = Replay(MemoryStore(), authorize=allow_all, max_frame_rate=100, frame_burst=3)
    topics = [f"t{i}" for i in range(12)]
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(url(port), topics=topics, max_frame_rate=50, frame_burst=3, on_error=errors.append) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            for topic in topics:
                await client.subscribe(topic)
    assert errors == []
    assert client.connections == 1


async def test_a_rate_limited_subscribe_is_sent_again() -> None:
    """A client configured faster than the server: the dropped subscribes (named by their ref) are retried."""
    errors: list[ServerError] = []
    # 10 frames/s: the six subscribes arrive well within the 100 ms that refill one token.
    replay = Replay(MemoryStore(), authorize=allow_all, max_frame_rate=10, frame_burst=4)
    topics = [f"t{i}" for i in range(6)]
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(
            url(port),
            topics=topics,
            max_frame_rate=1000,
            frame_burst=100,
            backoff=Backoff(initial=0.4, max=0.4),  # by then the bucket has refilled
            rng=lambda: 1.0,
            on_error=errors.append,
        ) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            for topic in topics:
                await client.subscribe(topic)
            await replay.publish("t5", "n", 1)
            (item,) = await take(client, 1)
    assert isinstance(item, Event) and item.topic == "t5"
    assert [(type(e), e.topic) for e in errors] == [(RateLimitedError, "t4"), (RateLimitedError, "t5")]
    assert client.connections == 1
