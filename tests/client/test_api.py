"""The module's surface: exports, argument checks, use outside the ``async with`` block."""

from __future__ import annotations

import anyio
import pytest

import starlette_replay.client as client_module
from starlette_replay.client import ClientClosed, FileCursorStore, ReplayClient


def test_exports() -> None:
    for name in client_module.__all__:
        assert hasattr(client_module, name), name
    assert sorted(client_module.__all__) == client_module.__all__


def test_bad_arguments_are_refused_early() -> None:
    with pytest.raises(ValueError, match="ws://"):
        ReplayClient("http://example.com/ws")
    with pytest.raises(ValueError, match="topic"):
        ReplayClient("ws://example.com/ws", topics=["no spaces"])
    with pytest.raises(TypeError):
        ReplayClient("ws://example.com/ws", topics="t")
    with pytest.raises(ValueError):
        ReplayClient("ws://example.com/ws", heartbeat_interval=0)
    with pytest.raises(ValueError):
        ReplayClient("ws://example.com/ws", ack_every=0)


def test_constructed_outside_an_event_loop() -> None:
    """A client (and a cursor store) may be built at import time and entered later in a loop."""
    client = ReplayClient("ws://127.0.0.1:9/ws", topics=["t"])
    FileCursorStore("/nonexistent/cursors.json")

    async def main() -> None:
        async with client:
            assert client.topics == ["t"]

    anyio.run(main)


@pytest.mark.anyio
async def test_using_the_client_outside_its_block() -> None:
    client = ReplayClient("ws://127.0.0.1:9/ws")
    with pytest.raises(ClientClosed):
        await client.subscribe("t")
    with pytest.raises(ClientClosed):
        await client.__anext__()
    async with client:
        pass
    with pytest.raises(ClientClosed):
        await client.subscribe("t")
    with pytest.raises(ClientClosed):
        async with client:
            pass
