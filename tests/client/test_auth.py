"""Handshake options: extra headers, extra subprotocols (a token), origin."""

from __future__ import annotations

import anyio
import pytest
from starlette.websockets import WebSocket

from starlette_replay import Event, MemoryStore, Refused, Replay, allow_all
from starlette_replay.client import Backoff, ReplayClient

from .helpers import TIMEOUT, FakeServer, Peer, replay_app, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


async def test_headers_and_subprotocol_token_reach_identify() -> None:
    seen: list[tuple[str | None, list[str]]] = []

    def identify(websocket: WebSocket) -> str:
        offered = list(websocket.scope.get("subprotocols", []))
        seen.append((websocket.headers.get("authorization"), offered))
        if "token.s3cret" not in offered or websocket.headers.get("authorization") != "Bearer abc":
            raise Refused("bad credentials")
        return "u1"

    replay = Replay(MemoryStore(), authorize=allow_all, identify=identify)
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(
            url(port),
            headers={"Authorization": "Bearer abc"},
            subprotocols=["token.s3cret"],
            backoff=FAST,
        ) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            await replay.publish("t", "n", 1)
            (item,) = await take(client, 1)
    assert isinstance(item, Event)
    assert seen == [("Bearer abc", ["replay.v1", "token.s3cret"])]


async def test_origin_header_is_sent() -> None:
    async def script(peer: Peer) -> None:
        assert peer.headers.get("origin") == "https://app.example"
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.until_closed()

    fake = FakeServer(script)
    async with serve(fake.app) as port, ReplayClient(url(port), origin="https://app.example", backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
    assert not fake.errors
