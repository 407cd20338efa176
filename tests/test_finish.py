"""``connection._finish``: a coroutine stepped outside any task, finished by the writer task.

The step an inline send takes in the pushing task may suspend; the writer then
drives the same coroutine on. It must behave as if one task had run it all:
resume at once when the wait is already over, wait for a pending future, and
deliver a cancellation to the coroutine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from starlette_replay.connection import _finish

pytestmark = pytest.mark.anyio


def step(coro: Any) -> Any:
    """What _send_inline does: one step, outside the task that will finish it."""
    return coro.send(None)


async def test_a_bare_yield_is_over_when_the_writer_picks_it_up() -> None:
    log: list[str] = []

    async def send() -> str:
        log.append("start")
        await asyncio.sleep(0)  # a checkpoint: one loop turn
        log.append("resumed")
        return "sent"

    coro = send()
    assert step(coro) is None
    assert await _finish(coro, None) == "sent"
    assert log == ["start", "resumed"]


async def test_a_future_done_meanwhile_resumes_at_once_with_its_result() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    async def send() -> int:
        return await future + 1

    coro = send()
    assert step(coro) is future
    future.set_result(41)
    assert await _finish(coro, future) == 42


async def test_a_pending_future_is_waited_for() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    async def send() -> int:
        return await future * 2

    coro = send()
    assert step(coro) is future
    loop.call_later(0.01, future.set_result, 21)
    assert await asyncio.wait_for(_finish(coro, future), 5) == 42


async def test_cancelling_the_writer_cancels_the_send() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def send() -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    coro = send()
    assert step(coro) is future

    async def writer() -> None:
        await _finish(coro, future)

    task = loop.create_task(writer())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]
    assert future.cancelled()  # as when a task awaiting it is cancelled
