"""Self-repair against a fake server that misbehaves on purpose: gaps, duplicates, silence."""

from __future__ import annotations

import anyio
import pytest

from starlette_replay import Event
from starlette_replay.client import Backoff, Cursor, ReplayClient, Reset

from .helpers import TIMEOUT, FakeServer, Peer, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


def offsets(items: list[Event | Reset]) -> list[int]:
    return [item.offset for item in items if isinstance(item, Event)]


async def test_gap_resubscribes_from_last_good_offset() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        first = await peer.recv()
        assert first == {"type": "subscribe", "topic": "t", "ref": first["ref"]}
        await peer.subscribed(first, "e1", 0)
        await peer.event("t", 1, "a")
        await peer.event("t", 2, "b")
        await peer.event("t", 4, "d")  # 3 is missing
        repair = await peer.recv()
        # With the time of the event at offset 2 (protocol.md, "Reused offsets").
        assert repair == {
            "type": "subscribe",
            "topic": "t",
            "epoch": "e1",
            "offset": 2,
            "time": 1002,
            "ref": repair["ref"],
        }
        assert repair["ref"] != first["ref"]
        # Frames of the replaced subscription still in flight are ignored until the new `subscribed`.
        await peer.event("t", 5, "stale")
        await peer.subscribed(repair, "e1", 4, resumed=True, recovered=True, replayed=2)
        await peer.event("t", 3, "c")
        await peer.event("t", 4, "d")
        await peer.event("t", 4, "d")  # a duplicate
        await peer.event("t", 2, "b")  # an old one
        await peer.event("t", 5, "e")
        await peer.until_closed()

    fake = FakeServer(script)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        items = await take(client, 5)
    assert not fake.errors
    assert offsets(items) == [1, 2, 3, 4, 5]
    assert [i.data for i in items if isinstance(i, Event)] == ["a", "b", "c", "d", "e"]
    assert all(isinstance(i, Event) and i.epoch == "e1" for i in items)
    assert len(fake.peers) == 1  # repaired on the same connection


async def test_reconnect_resumes_with_cursor_and_drops_replayed_duplicates() -> None:
    async def first(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        await peer.event("t", 2)
        await peer.ws.close(1012)

    async def second(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        assert (request["epoch"], request["offset"], request["time"]) == ("e1", 2, 1002)
        # A server that resumes from further back than asked: the client drops what it has.
        await peer.subscribed(request, "e1", 3, resumed=True, recovered=True, replayed=3)
        for offset in (1, 2, 3):
            await peer.event("t", offset)
        await peer.until_closed()

    fake = FakeServer(first, second)
    async with serve(fake.app) as port, ReplayClient(url(port), topics=["t"], backoff=FAST) as client:
        items = await take(client, 3)
    assert not fake.errors
    assert offsets(items) == [1, 2, 3]
    assert client.connections == 2


async def test_cursor_ahead_of_head_is_a_reset() -> None:
    """The server says recovered:false (cursor ahead of its head): the app hears of it, in order."""

    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        assert (request["epoch"], request["offset"]) == ("e1", 10)
        assert "time" not in request  # the app's cursor names no event this client received
        await peer.subscribed(request, "e1", 2, resumed=True, recovered=False, replayed=2)
        await peer.event("t", 1)
        await peer.event("t", 2)
        await peer.until_closed()

    fake = FakeServer(script)
    async with (
        serve(fake.app) as port,
        ReplayClient(url(port), topics={"t": Cursor("e1", 10)}, backoff=FAST) as client,
    ):
        reset, *events = await take(client, 3)
    assert not fake.errors
    assert reset == Reset("t", "e1", 0, 2, Cursor("e1", 10))
    assert offsets(events) == [1, 2]


async def test_heartbeat_silence_means_dead_socket() -> None:
    """A server that stops sending anything (no event, no ping) is left for another connection."""
    went_silent = anyio.Event()

    async def silent(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        went_silent.set()
        await peer.until_closed()  # says nothing more; the client must hang up by itself

    async def healthy(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        assert (request["epoch"], request["offset"]) == ("e1", 1)
        await peer.subscribed(request, "e1", 2, resumed=True, recovered=True, replayed=1)
        await peer.event("t", 2)
        await peer.until_closed()

    fake = FakeServer(silent, healthy)
    async with (
        serve(fake.app) as port,
        ReplayClient(url(port), topics=["t"], heartbeat_interval=0.25, backoff=FAST) as client,
    ):
        items = await take(client, 2)
        assert went_silent.is_set()
    assert not fake.errors
    assert offsets(items) == [1, 2]
    assert len(fake.peers) == 2


async def test_server_pings_keep_a_quiet_connection_alive() -> None:
    """Server pings (no reply needed) are enough to stay connected through quiet periods."""
    pinged = anyio.Event()

    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        await peer.subscribed(request, "e1", 0)
        for _ in range(16):  # 0.8 s of quiet, longer than the client's 0.6 s silence limit
            with anyio.move_on_after(0.05):
                await anyio.Event().wait()  # the server's idle interval passes
            await peer.send(type="ping")
        pinged.set()
        await peer.event("t", 1)
        await peer.until_closed()

    fake = FakeServer(script)
    async with (
        serve(fake.app) as port,
        ReplayClient(url(port), topics=["t"], heartbeat_interval=0.3, backoff=FAST) as client,
    ):
        (item,) = await take(client, 1)
        with anyio.fail_after(TIMEOUT):
            await pinged.wait()
    assert not fake.errors
    assert isinstance(item, Event) and item.offset == 1
    assert len(fake.peers) == 1
    # The client answered nothing to the pings: the only frame it sent is its subscribe.
    assert [f["type"] for f in fake.peers[0].received] == ["subscribe"]
