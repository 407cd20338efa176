"""Many clients subscribing, resubscribing and resuming while events keep coming: each one
gets exactly head-replayed+1 .. the last event, in order, once (a seeded, bounded run)."""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from starlette_replay import Event, MemoryStore, Position, Replay, allow_all

from .helpers import Client, connect, make_app, running

pytestmark = pytest.mark.anyio

EVENTS = 400


class YieldingStore(MemoryStore):
    """A MemoryStore that lets other tasks run inside position() and read(), as a networked store would."""

    def __init__(self, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rng = rng

    async def _yield(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await anyio.lowlevel.checkpoint()

    async def position(self, topic: str) -> Position:
        await self._yield()
        return await super().position(topic)

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        await self._yield()
        return await super().read(topic, after, limit)


async def _follow(c: Client, rng: random.Random, final: list[int]) -> None:
    """Subscribe (fresh, rewind or cursor), sometimes resubscribe from the last offset,
    and check every frame; stop once the last published event arrived."""
    epoch: str | None = None
    last: int | None = None
    expected_next: int | None = None
    resubscribes = 0
    fields: dict[str, Any] = rng.choice([{}, {"rewind": rng.randrange(0, 50)}, {"rewind": 10**6}])
    await c.send({"type": "subscribe", "topic": "t", **fields})
    with anyio.fail_after(30):
        while True:
            frame = await c.recv()
            if frame["type"] == "subscribed":
                if epoch is not None:
                    assert frame["epoch"] == epoch
                epoch = frame["epoch"]
                expected_next = frame["offset"] - frame["replayed"] + 1
                continue
            assert frame["type"] == "event", frame
            assert frame["offset"] == expected_next, (frame["offset"], expected_next)
            last = frame["offset"]
            expected_next = last + 1
            if final and last == final[0]:
                return
            if resubscribes < 3 and rng.random() < 0.02:
                resubscribes += 1
                cursor = last
                await c.send({"type": "subscribe", "topic": "t", "epoch": epoch, "offset": cursor})
                # frames of the old subscription already queued still arrive first
                while True:
                    frame = await c.recv()
                    if frame["type"] == "subscribed":
                        assert (frame["resumed"], frame["recovered"]) == (True, True), frame
                        expected_next = frame["offset"] - frame["replayed"] + 1
                        assert expected_next == cursor + 1, f"{frame} cursor={cursor}"
                        break
                    assert frame["offset"] == expected_next
                    expected_next += 1


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_clients_join_while_publishing(seed: int) -> None:
    rng = random.Random(seed)
    store = YieldingStore(rng, history_size=10_000)
    replay = Replay(store, authorize=allow_all, replay_page_size=7, send_queue_size=100_000)
    async with running(make_app(replay)) as app:
        final: list[int] = []
        failures: list[BaseException] = []

        async def client() -> None:
            # Failures are collected, not raised: cancelling the other clients' httpx-ws
            # transports can hang anyio (a cyclic CancelledError context), hiding the cause.
            for _ in range(rng.randrange(6)):
                await anyio.lowlevel.checkpoint()
            try:
                async with connect(app) as c:
                    await _follow(c, rng, final)
            except Exception as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            published = 0
            for _ in range(12):
                tg.start_soon(client)
            while published < EVENTS:
                n = rng.randrange(1, 6)
                await replay.publish_many("t", [("x", published + i) for i in range(n)])
                published += n
                for _ in range(rng.randrange(3)):
                    await anyio.lowlevel.checkpoint()
            # a marker so every client knows where the end is
            event = await replay.publish("t", "end", None)
            final.append(event.offset)
        assert not failures, failures
    assert replay.stats()["connections"] == 0
