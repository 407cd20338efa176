"""What the client does on each close code and handshake status (protocol: "What a client does on close")."""

from __future__ import annotations

import anyio
import pytest
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket

from starlette_replay import Event, MemoryStore, Refused, Replay, allow_all
from starlette_replay.client import (
    Backoff,
    ClientClosed,
    ClientStopped,
    HandshakeRejected,
    ReplayClient,
    ServerClosed,
)

from .helpers import TIMEOUT, FakeServer, Peer, replay_app, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


def refuse(websocket: WebSocket) -> str:
    raise Refused("no token")


async def test_http_403_from_identify_stops_with_an_exception() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all, identify=refuse)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT), pytest.raises(HandshakeRejected) as info:
            async for _ in client:
                pass
        assert info.value.status == 403
        # Every later call says the same.
        with pytest.raises(HandshakeRejected):
            await client.subscribe("u")
        with pytest.raises(HandshakeRejected):
            await client.__anext__()
    assert client.connections == 0


async def test_http_403_from_the_origin_check() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port:
        async with ReplayClient(url(port), origin="https://evil.example", backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT), pytest.raises(HandshakeRejected) as info:
                await client.subscribe("t")
            assert info.value.status == 403
        # The same origin as the Host header is accepted.
        async with ReplayClient(url(port), origin=f"http://127.0.0.1:{port}", backoff=FAST) as client:
            with anyio.fail_after(TIMEOUT):
                await client.subscribe("t")
                await replay.publish("t", "n", 1)
                (item,) = await take(client, 1)
            assert isinstance(item, Event)


@pytest.mark.parametrize("code", [1000, 1008, 1009])
async def test_final_close_codes_stop_after_delivering_what_arrived(code: int) -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        await peer.event("t", 2)
        await peer.ws.close(code, "go away")

    fake = FakeServer(script)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        items = await take(client, 2)
        with anyio.fail_after(TIMEOUT), pytest.raises(ServerClosed) as info:
            await client.__anext__()
        assert (info.value.code, info.value.reason) == (code, "go away")
        assert isinstance(info.value, ClientStopped)
    assert [i.offset for i in items if isinstance(i, Event)] == [1, 2]
    assert len(fake.peers) == 1  # no reconnect


@pytest.mark.parametrize("code", [1001, 1011, 1012, 1013])
async def test_retryable_close_codes_reconnect(code: int) -> None:
    async def first(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        await peer.ws.close(code)

    async def second(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        assert (request["epoch"], request["offset"]) == ("e1", 1)
        await peer.subscribed(request, "e1", 1, resumed=True, recovered=True)
        await peer.event("t", 2)
        await peer.until_closed()

    fake = FakeServer(first, second)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        items = await take(client, 2)
    assert not fake.errors
    assert [i.offset for i in items if isinstance(i, Event)] == [1, 2]
    assert len(fake.peers) == 2


async def test_http_5xx_and_429_at_the_handshake_are_retried() -> None:
    async def deny(peer: Peer) -> None:
        status = {0: 503, 1: 500, 2: 429}[peer.number]
        await peer.ws.send_denial_response(PlainTextResponse("busy", status_code=status))

    async def serve_one(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 1, replayed=1)
        await peer.event("t", 1)
        await peer.until_closed()

    fake = FakeServer(deny, deny, deny, serve_one)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        items = await take(client, 1)
    assert not fake.errors
    assert [i.offset for i in items if isinstance(i, Event)] == [1]
    assert (len(fake.peers), client.connections) == (4, 1)


async def test_unknown_path_stops() -> None:
    fake = FakeServer()
    async with serve(fake.app) as port, ReplayClient(f"ws://127.0.0.1:{port}/nowhere", backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT), pytest.raises(HandshakeRejected) as info:
            await client.__anext__()
    assert info.value.status == 403  # Starlette refuses a WebSocket to an unknown route before accepting it


async def test_aclose_ends_iteration_and_closes_with_1000() -> None:
    closed: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        message = await peer.ws.receive()
        closed.append(message["code"])

    fake = FakeServer(script)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.aclose)  # from another task
                async for _ in client:
                    pytest.fail("no item expected")
            with pytest.raises(ClientClosed):
                await client.subscribe("u")
            await client.aclose()  # twice is fine
    assert not fake.errors
    assert closed == [1000]


async def test_an_event_larger_than_max_size_stops_the_client() -> None:
    """Reconnecting would replay the same event and fail again: stop and say why."""
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(url(port), max_size=1024, connect_options={"compression": None}, backoff=FAST) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            await replay.publish("t", "small", "x")
            await replay.publish("t", "big", "x" * 2000)
            (item,) = await take(client, 1)
            with pytest.raises(ClientStopped, match="max_size=1024") as info:
                await client.__anext__()
    assert isinstance(item, Event) and item.offset == 1
    assert not isinstance(info.value, ServerClosed)
    assert client.connections == 1


async def test_cancelling_the_owner_still_closes_with_1000() -> None:
    closed = anyio.Event()
    codes: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        message = await peer.ws.receive()
        codes.append(message["code"])
        closed.set()

    fake = FakeServer(script)
    subscribed = anyio.Event()

    async def owner() -> None:
        async with ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
            await client.subscribe("t")
            subscribed.set()
            await anyio.sleep_forever()

    async with serve(fake.app) as port:
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(owner)
                await subscribed.wait()
                tg.cancel_scope.cancel()
            await closed.wait()
    assert not fake.errors
    assert codes == [1000]
