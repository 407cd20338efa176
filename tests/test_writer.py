"""The writer: started for frames that must wait, parked when done, retired when idle.

On asyncio with Python 3.12+ a frame pushed to an idle connection is sent
inline (in an eager task of its own); without inline sends (``_EAGER_TASKS``
false, as on Python 3.11; or no asyncio loop, as under trio) every frame is
queued for the writer, which parks on a bare future on asyncio and on an
``anyio.Event`` elsewhere. The in-process transport suspends in every send, so
here the writer is started on every path. Each event below is published only
after the client received the previous one. Every path must deliver every
frame, in order, retire the writer after a heartbeat interval of idleness (an
idle connection holds no writer task), start it again for the next frame, and
still close on demand.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from starlette_replay import MemoryStore, Replay, allow_all
from starlette_replay import connection as connection_module
from starlette_replay.connection import WriterState
from starlette_replay.protocol import CloseCode

from .helpers import connect, make_app, running

pytestmark = pytest.mark.anyio

EVENTS = 20


async def test_inline_sends_are_enabled_on_asyncio_with_eager_tasks() -> None:
    assert connection_module._EAGER_TASKS is (sys.version_info >= (3, 12))
    assert connection_module._asyncio_loop() is asyncio.get_running_loop()


@pytest.mark.parametrize("path", ["inline", "writer", "writer-on-event"])
async def test_the_writer_parks_retires_and_starts_again(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "inline" and sys.version_info < (3, 12):
        pytest.skip("inline sends need eager tasks: run on Python 3.12+ (make test-core PYTHON=python3.12)")
    if path != "inline":
        monkeypatch.setattr(connection_module, "_EAGER_TASKS", False)  # as on Python 3.11
    if path == "writer-on-event":
        monkeypatch.setattr(connection_module, "_asyncio_loop", lambda: None)  # as under trio
    replay = Replay(MemoryStore(), authorize=allow_all, heartbeat_interval=0.2)
    async with running(make_app(replay)) as app, connect(app) as client:
        with anyio.fail_after(10):
            await client.subscribe("t")
            [conn] = list(replay._registry.connections)
            assert (conn._loop is not None) is (path != "writer-on-event")
            for round_ in range(2):
                for i in range(EVENTS):
                    await replay.publish("t", "tick", {"i": i})
                    [event] = await client.events(1)
                    assert event["offset"] == round_ * EVENTS + i + 1
                    assert event["data"] == {"i": i}
                assert conn._writer_state is WriterState.PARKED  # not ended, between events
                wakeup_type = anyio.Event if path == "writer-on-event" else asyncio.Future
                assert isinstance(conn._wakeup, wakeup_type)
                # Idle for a heartbeat interval: a ping, and the writer ends.
                assert await client.recv(within=2) == {"type": "ping"}
                while conn._writer_state is not WriterState.ABSENT:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                assert conn._wakeup is None and conn.queued == 0
            # Abort while no writer runs: the reader stops, the close goes out.
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
            [conn] = list(replay._registry.connections)
            assert conn.queued == 0
            assert len(conn._queue) <= 1  # emptied once the writer caught up (the pong may be in flight)


async def test_frames_after_accept_go_to_the_asgi_send_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Starlette's WebSocket.send checks its state machine on every call; the
    # connection's frames skip it (the accept and the close still go through it).
    through_websocket_send: list[str] = []
    starlette_send = WebSocket.send

    async def recording_send(self: WebSocket, message: Message) -> None:
        through_websocket_send.append(message["type"])
        await starlette_send(self, message)

    monkeypatch.setattr(WebSocket, "send", recording_send)
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(make_app(replay)) as app, connect(app) as client:
        with anyio.fail_after(10):
            await client.subscribe("t")
            for i in range(3):
                await replay.publish("t", "tick", {"i": i})
            assert [e["data"]["i"] for e in await client.events(3)] == [0, 1, 2]
            [conn] = list(replay._registry.connections)
            conn.abort(CloseCode.TRY_AGAIN_LATER, "test")
            assert await client.closed() == CloseCode.TRY_AGAIN_LATER
    assert through_websocket_send == ["websocket.accept", "websocket.close"]


async def test_a_websocket_class_with_its_own_send_is_sent_through_it() -> None:
    async def asgi_send(message: Message) -> None:
        pass

    async def asgi_receive() -> Message:
        return {"type": "websocket.connect"}

    class Wrapped(WebSocket):
        async def send(self, message: Message) -> None:
            await super().send(message)

    scope = {"type": "websocket", "path": "/ws", "headers": []}
    assert connection_module._asgi_send(WebSocket(scope, asgi_receive, asgi_send)) is asgi_send
    wrapped = Wrapped(scope, asgi_receive, asgi_send)
    assert connection_module._asgi_send(wrapped) == wrapped.send


class _Awaitable:
    """Awaitable, but no coroutine: what an ASGI send is allowed to return."""

    def __init__(self, coro: Any) -> None:
        self.coro = coro

    def __await__(self) -> Any:
        return self.coro.__await__()


class _SendReturningAwaitables:
    """An ASGI endpoint in front of the library's whose ``send`` returns awaitables that are not coroutines."""

    def __init__(self, replay: Replay) -> None:
        self.replay = replay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.replay.endpoint(WebSocket(scope, receive, lambda message: _Awaitable(send(message))))


async def test_an_asgi_send_that_returns_another_awaitable_is_awaited() -> None:
    # An ASGI send is only promised to return an awaitable: a non-coroutine one
    # must work inline and through the writer.
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = Starlette(routes=[WebSocketRoute("/ws", _SendReturningAwaitables(replay))], lifespan=replay.lifespan)
    async with running(app) as client_app, connect(client_app) as client:
        with anyio.fail_after(10):
            await client.subscribe("t")
            for i in range(20):  # past the inline bound in one turn: inline sends and the writer
                await replay.publish("t", "tick", {"i": i})
            assert [e["data"]["i"] for e in await client.events(20)] == list(range(20))
            await replay.publish("t", "tick", {"i": 20})
            [event] = await client.events(1)
            assert event["offset"] == 21
            assert replay.stats()["connections"] == 1


class _SendRaisingWhenCalled:
    """An ASGI endpoint in front of the library's whose ``send`` is a plain function
    that raises at once for event frames (as a broken transport or wrapper might)."""

    def __init__(self, replay: Replay) -> None:
        self.replay = replay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        def failing_send(message: Message) -> Any:
            if '"type":"event"' in message.get("text", ""):
                raise OSError("transport gone")
            return send(message)

        await self.replay.endpoint(WebSocket(scope, receive, failing_send))


async def test_an_asgi_send_that_raises_when_called_stops_that_connection_only() -> None:
    # The frame is sent from the publisher's task: a send that raises as it is
    # called must end that connection, not the publish or the other subscribers.
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = Starlette(
        routes=[replay.route("/ws"), WebSocketRoute("/broken", _SendRaisingWhenCalled(replay))],
        lifespan=replay.lifespan,
    )
    async with running(app) as client_app, connect(client_app) as good:
        async with connect(client_app, path="/broken") as broken:
            with anyio.fail_after(10):
                await good.subscribe("t")
                await broken.subscribe("t")
                for i in range(3):
                    await replay.publish("t", "tick", {"i": i})
                assert [e["data"]["i"] for e in await good.events(3)] == [0, 1, 2]
                while replay.stats()["connections"] == 2:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
