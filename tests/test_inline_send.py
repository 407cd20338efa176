"""Inline sends: a frame pushed while a connection has nothing queued is sent at
once, in an eager task of the connection (Python 3.12+), up to a few per
connection per loop turn; the rest of a burst goes through the writer, which
also waits for a send that had to wait, in one order. Never by the pushing task.

The fake socket's ``send`` completes without suspending (as uvicorn's does
while the socket's buffer has room) unless ``stalled``; it records the task that
sent each frame. Tests marked ``needs_eager`` are about inline sends; the others
hold on the writer-only path too (Python 3.11).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from starlette_replay import MemoryStore, Replay, allow_all
from starlette_replay import connection as connection_module
from starlette_replay.connection import WriterState

from .helpers import TIMEOUT, FakeWebSocket, serve_fake

pytestmark = pytest.mark.anyio

needs_eager = pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="inline sends need eager tasks: run on Python 3.12+ (make test-core PYTHON=python3.12)",
)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class RecordingWebSocket(FakeWebSocket):
    """Also records the ``request_id`` each frame was sent under."""

    def __init__(self) -> None:
        super().__init__()
        self.request_ids: list[str] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.request_ids.append(request_id.get())
        await super().send(message)


async def subscribed(replay: Replay, tg: Any, ws: FakeWebSocket, name: str = "c") -> None:
    async def serve() -> None:
        request_id.set(f"conn-{name}")  # what a middleware would set for the connection
        await serve_fake(replay, ws, name)

    tg.start_soon(serve)
    await ws.client_sends({"type": "subscribe", "topic": "t"})
    assert (await ws.wait_for(1))[0]["type"] == "subscribed"
    await wait_parked(replay)


async def wait_parked(replay: Replay) -> None:
    """Until no connection has a writer sending or anything queued."""
    with anyio.fail_after(TIMEOUT):
        while any(conn._writer_state >= WriterState.SENDING or conn.queued for conn in replay._registry.connections):
            await anyio.lowlevel.checkpoint()


@asynccontextmanager
async def subscribers(sockets: dict[str, FakeWebSocket], **options: Any) -> AsyncIterator[Replay]:
    """A running Replay on a MemoryStore with these fake connections (by name) subscribed to "t"."""
    replay = Replay(MemoryStore(), authorize=allow_all, **options)
    async with replay, anyio.create_task_group() as tg:
        for name, ws in sockets.items():
            await subscribed(replay, tg, ws, name)
        yield replay
        tg.cancel_scope.cancel()
    for ws in sockets.values():
        ws.close_streams()


@asynccontextmanager
async def one_subscriber(**options: Any) -> AsyncIterator[tuple[Replay, FakeWebSocket]]:
    ws = FakeWebSocket()
    async with subscribers({"c": ws}, **options) as replay:
        yield replay, ws


async def publish_each_in_a_turn(replay: Replay, n: int) -> None:
    for i in range(n):
        await replay.publish("t", "x", i)
        await anyio.lowlevel.checkpoint()  # the next loop turn


def offsets(ws: FakeWebSocket) -> list[int]:
    return [frame["offset"] for frame in ws.sent if frame["type"] == "event"]


@needs_eager
async def test_a_parked_connection_is_sent_to_at_once_in_a_task_of_its_own() -> None:
    a, b = RecordingWebSocket(), RecordingWebSocket()
    async with subscribers({"a": a, "b": b}) as replay:
        me = asyncio.current_task()
        for i in range(1, 4):
            await replay.publish("t", "x", i)
            # sent before publish() returned, no writer woken, and not by this task:
            # each send ran in an eager task of its own
            assert offsets(a) == offsets(b) == list(range(1, i + 1))
            assert a.senders[-1] is not me and b.senders[-1] is not me
            assert a.senders[-1] is not b.senders[-1]
            await anyio.lowlevel.checkpoint()  # the next loop turn
        # in the connection's context, not the publisher's
        assert a.request_ids[-3:] == ["conn-a"] * 3 and b.request_ids[-3:] == ["conn-b"] * 3
        assert replay.stats()["queued_frames"] == 0


@needs_eager
async def test_a_burst_in_one_turn_is_sent_inline_up_to_a_bound_then_by_the_writer() -> None:
    inline, burst = connection_module._INLINE_PER_TURN, connection_module._INLINE_PER_TURN + 4
    async with one_subscriber() as (replay, ws):
        me = asyncio.current_task()
        for i in range(burst):
            await replay.publish("t", "x", i)  # a MemoryStore append never yields
        assert offsets(ws) == list(range(1, inline + 1))
        assert replay.stats()["queued_frames"] == burst - inline
        await ws.wait_for(1 + burst)
        assert offsets(ws) == list(range(1, burst + 1))
        writer = ws.senders[1 + inline]
        inline_senders = ws.senders[1 : 1 + inline]
        assert me not in inline_senders and len(set(map(id, inline_senders))) == inline  # a task each
        assert writer is not me and ws.senders[1 + inline :] == [writer] * (burst - inline)
        # Parked again: the next event is inline again.
        await wait_parked(replay)
        await replay.publish("t", "x", burst)
        assert offsets(ws) == list(range(1, burst + 2)) and ws.senders[-1] not in (me, writer)


async def test_an_inline_send_that_waits_is_finished_by_the_writer_before_the_queue() -> None:
    async with one_subscriber(send_queue_size=100) as (replay, ws):
        ws.stalled = True
        await publish_each_in_a_turn(replay, 5)  # only the first send is in flight, stalled
        assert offsets(ws) == []
        assert len(ws.texts) == 2  # the stalled first event and the subscribed reply
        assert replay.stats()["queued_frames"] == 4  # the rest waits in the queue, counted
        ws.stalled = False
        ws.unstall.set()
        await ws.wait_for(6)
        assert offsets(ws) == [1, 2, 3, 4, 5]
        assert len(ws.texts) == 6  # each sent once
        await wait_parked(replay)
        await replay.publish("t", "x", 5)
        await ws.wait_for(7)
        assert offsets(ws) == [1, 2, 3, 4, 5, 6]


async def test_a_slow_consumer_is_still_closed_when_its_first_send_waits() -> None:
    async with one_subscriber(send_queue_size=4) as (replay, ws):
        ws.stalled = True
        await publish_each_in_a_turn(replay, 6)
        with anyio.fail_after(TIMEOUT):
            await ws.closed.wait()
        assert ws.closed_with is not None and ws.closed_with[0] == 1013
    assert replay.stats() == {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}


async def test_an_inline_send_that_fails_stops_that_connection_only() -> None:
    gone, ok = FakeWebSocket(), FakeWebSocket()
    async with subscribers({"gone": gone, "ok": ok}) as replay:
        gone.fail = True
        await replay.publish("t", "x", 0)  # does not raise
        with anyio.fail_after(TIMEOUT):
            while replay.stats()["connections"] != 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert gone.closed_with is None  # the peer is gone: nothing to close
        await anyio.lowlevel.checkpoint()  # the next loop turn
        await replay.publish("t", "x", 1)
        await ok.wait_for(3)
        assert offsets(ok) == [1, 2]


async def test_frames_queued_before_an_abort_go_out_ahead_of_the_close() -> None:
    async with one_subscriber() as (replay, ws):
        [conn] = list(replay._registry.connections)
        for i in range(3):
            await replay.publish("t", "x", i)  # one inline, two queued for a writer that has not run
        conn.abort(1008, "test")
        with anyio.fail_after(TIMEOUT):
            await ws.closed.wait()
        assert offsets(ws) == [1, 2, 3]
        assert ws.closed_with == (1008, "test")


async def test_nothing_goes_out_after_a_send_that_did_not_finish() -> None:
    async with one_subscriber() as (replay, ws):
        [conn] = list(replay._registry.connections)
        ws.stalled = True
        for i in range(3):
            await replay.publish("t", "x", i)  # the first send waits; the others are queued behind it
        with anyio.fail_after(TIMEOUT):
            await ws.send_attempted.wait()
        ws.stalled = False  # the socket would take the queued frames now, but 1 never finished
        conn.abort(1008, "test")
        with anyio.fail_after(TIMEOUT):
            await ws.closed.wait()
        assert offsets(ws) == []  # not 2 and 3 without 1: no hole
        assert ws.closed_with == (1008, "test")


async def test_a_frame_sent_between_heartbeat_ticks_puts_the_ping_off() -> None:
    # The heartbeat timer (every interval / 4) sees sends by their count, not by a
    # clock read per frame: a tick that finds frames sent since the last one counts
    # the connection busy from then, and only a full interval of ticks with nothing
    # sent brings a ping.
    async with one_subscriber() as (replay, ws):
        [conn] = list(replay._registry.connections)
        interval, now = 10.0, conn._idle_since
        conn.heartbeat(now + interval + 1, interval)  # the subscribed reply went out since: busy
        await replay.publish("t", "x", 1)  # sent (inline on 3.12+), after that tick
        await ws.wait_for(2)
        assert offsets(ws) == [1]
        conn.heartbeat(now + 2 * interval + 0.5, interval)  # a frame went out since the last tick: busy
        conn.heartbeat(now + 3 * interval, interval)  # 0.95 intervals since that tick: no ping yet
        assert "ping" not in ws.texts[-1]
        conn.heartbeat(now + 3 * interval + 0.5, interval)  # a full interval with nothing sent
        with anyio.fail_after(TIMEOUT):
            while '"ping"' not in ws.texts[-1]:
                await anyio.lowlevel.checkpoint()
        assert [frame["type"] for frame in ws.sent] == ["subscribed", "event", "ping"]
        conn.heartbeat(now + 3 * interval + 1, interval)  # the ping was sent: busy again
        conn.heartbeat(now + 4 * interval, interval)
        assert [frame["type"] for frame in ws.sent] == ["subscribed", "event", "ping"]
