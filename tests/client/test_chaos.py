"""A fake server that duplicates, skips and hangs up at random (seeded): the app still sees 1..N once, in order."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import pytest
from starlette.websockets import WebSocketDisconnect

from starlette_replay import Event
from starlette_replay.client import Backoff, ReplayClient

from .helpers import TIMEOUT, FakeServer, Peer, serve, take, url

pytestmark = pytest.mark.anyio

N = 150


def chaos(seed: int) -> Any:
    async def script(peer: Peer) -> None:
        rng = random.Random(seed * 1000 + peer.number)
        await peer.accept()
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](100)

        async def read() -> None:
            try:
                while True:
                    await send.send(json.loads(await peer.ws.receive_text()))
            except WebSocketDisconnect:
                pass
            finally:
                send.close()

        async def subscribe(request: dict[str, Any]) -> int:
            after = request["offset"] if request.get("epoch") == "e1" else 0
            await peer.subscribed(request, "e1", N, resumed="epoch" in request, recovered=True, replayed=N - after)
            return after + 1

        async def run() -> None:
            offset = await subscribe(await receive.receive())
            while True:
                try:
                    request = receive.receive_nowait()
                except anyio.WouldBlock:
                    request = None
                if request is not None and request["type"] == "subscribe":
                    offset = await subscribe(request)
                    continue
                if offset > N:
                    request = await receive.receive()  # idle until the client subscribes again or leaves
                    if request["type"] == "subscribe":
                        offset = await subscribe(request)
                    continue
                dice = rng.random()
                if dice < 0.02:
                    await peer.ws.close(rng.choice([1001, 1011, 1012, 1013]))
                    return
                if dice < 0.05 and offset > 1:
                    await peer.event("t", offset - rng.randint(1, min(offset - 1, 3)))  # a duplicate
                elif dice < 0.08 and offset < N:
                    offset += 1  # a gap: the client must notice and resubscribe
                await peer.event("t", offset, offset)
                offset += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with receive, anyio.fail_after(TIMEOUT):
                try:
                    await run()
                except anyio.EndOfStream:
                    pass  # the client left
            tg.cancel_scope.cancel()

    return script


@pytest.mark.parametrize("seed", [1, 2])
async def test_exactly_once_in_order_through_chaos(seed: int) -> None:
    fake = FakeServer(chaos(seed))
    backoff = Backoff(initial=0.005, max=0.02)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=backoff) as client:
        items = await take(client, N)
    assert not fake.errors
    assert [i.offset for i in items if isinstance(i, Event)] == list(range(1, N + 1))
    assert [i.data for i in items if isinstance(i, Event)] == list(range(1, N + 1))
    assert len(fake.peers) > 1  # it did hang up on the client
