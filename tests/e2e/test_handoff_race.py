"""The replay -> live hand-off, made wide on purpose.

The server's store sleeps in every ``read()`` (``REPLAY_READ_DELAY``) and
replays in small pages, so a subscription from an old cursor spends a few
hundred milliseconds replaying while events keep being published: those live
events pile up in the subscription's buffer and must be merged by offset when
it goes live. Subscriptions start one after another while the pump runs, so
every one of them hands off mid-stream. Any gap, duplicate or 1013 fails.

``store.position()`` is slowed too, so that live events also reach a new
subscription *before* it reads the head: the replay sends those, and the merge
must drop their buffered copies.

(Checked by hand: with ``Subscription.go_live`` dropping its pending buffer,
every subscription here is closed with 1013 "gap in live events"; with
``Subscription.offer`` forwarding offsets at or below ``last``, every one
reports duplicates.)
"""

from __future__ import annotations

import os
import random

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from starlette_replay.protocol import EventFrame, Subscribed
from tests.e2e.client import Subscriber, abort_all
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "race"
BACKLOG = 300
PUMPED = 500  # one every PUMP_INTERVAL s: the pump runs for 1.5-3 s
PUMP_INTERVAL = 0.003
READ_DELAY = 0.03  # per store.read(); pages of PAGE_SIZE: replaying 100+ events takes 120+ ms
PAGE_SIZE = 25
POSITION_DELAY = 0.02  # live events reach the subscription before it reads the head: the merge must drop them
SUBSCRIPTIONS = 16
STAGGER = 25  # a new subscription every STAGGER published events


class Progress:
    """The live offset a watcher has seen; tasks wait for it to reach a target."""

    def __init__(self) -> None:
        self.offset = 0
        self._waiters: list[tuple[int, anyio.Event]] = []

    def advance(self, offset: int) -> None:
        self.offset = offset
        for waiter in [w for w in self._waiters if w[0] <= offset]:
            self._waiters.remove(waiter)
            waiter[1].set()

    async def reached(self, target: int) -> None:
        if self.offset < target:
            event = anyio.Event()
            self._waiters.append((target, event))
            await event.wait()


async def test_replay_to_live_handoff_has_no_gap(uvicorn_servers: ServerFactory, store_env: dict[str, str]) -> None:
    seed = int(os.environ.get("E2E_SEED") or random.randrange(2**32))
    print(f"hand-off race seed: {seed}")
    rng = random.Random(seed)
    server = uvicorn_servers(
        env={
            **store_env,
            "REPLAY_READ_DELAY": READ_DELAY,
            "REPLAY_POSITION_DELAY": POSITION_DELAY,
            "REPLAY_PAGE_SIZE": PAGE_SIZE,
        }
    )
    final = BACKLOG + PUMPED
    progress = Progress()
    watcher = Subscriber(server.ws_url(), [TOPIC], name="watcher", rewind=0)
    racers: list[tuple[int, Subscriber]] = []

    async def watch() -> None:
        while watcher.offset(TOPIC) < final:
            frame = await watcher.recv()
            if isinstance(frame, EventFrame):
                progress.advance(frame.offset)

    async def race(n: int, epoch: str) -> None:
        await progress.reached(BACKLOG + STAGGER * n)
        now = progress.offset
        cursor = rng.randint(max(0, now - 250), now - 100)
        racer = Subscriber(server.ws_url(), [TOPIC], name=f"racer{n}")
        racer.cursors[TOPIC] = (epoch, cursor)
        racers.append((cursor, racer))
        await racer.connect()
        try:
            await racer.read_until({TOPIC: final})
        except ConnectionClosed:
            return  # recorded in racer.server_closes, reported below with the others
        await racer.drop()

    try:
        with anyio.fail_after(40):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
                backlog = (await http.post("/publish", json={"topic": TOPIC, "count": BACKLOG, "batch": True})).json()
                epoch = backlog["epoch"]
                await watcher.connect()
                subscribed = await watcher.recv()
                assert isinstance(subscribed, Subscribed) and subscribed.offset == BACKLOG, subscribed
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    for n in range(SUBSCRIPTIONS):
                        tg.start_soon(race, n, epoch)
                    pump = (
                        await http.post("/pump", json={"topics": [TOPIC], "count": PUMPED, "interval": PUMP_INTERVAL})
                    ).json()
                    published = (await http.post(f"/pump/{pump['id']}/wait")).json()
                    assert published[TOPIC] == {"epoch": epoch, "last": final}
                await watcher.drop()
    finally:
        abort_all([watcher, *(racer for _, racer in racers)])

    problems = list(watcher.violations)
    assert watcher.offsets(TOPIC) == list(range(BACKLOG + 1, final + 1))
    for cursor, racer in racers:
        problems += racer.violations
        problems += [f"{racer.name} closed by the server: {close}" for close in racer.server_closes]
        if len(racer.subscribed_frames) != 1 or racer.subscribed_frames[0].replayed < 100:
            problems.append(f"{racer.name}: not one long replay: {racer.subscribed_frames}")
        if racer.offsets(TOPIC) != list(range(cursor + 1, final + 1)):
            problems.append(f"{racer.name} from {cursor}: got {len(racer.offsets(TOPIC))} events, not gap-free")
        # Payloads match offsets: backlog events carry i = offset - 1, pumped ones i = offset - BACKLOG - 1.
        if any(d.data["i"] != d.offset - 1 - (BACKLOG if d.offset > BACKLOG else 0) for d in racer.delivered[TOPIC]):
            problems.append(f"{racer.name}: a payload does not match its offset")
    assert len(racers) == SUBSCRIPTIONS
    # Subscriptions that started mid-stream (a long replay, then live events): the hand-offs under test.
    # All of them normally; a machine so loaded that the pump ended first would test less.
    mid_stream = sum(1 for _, r in racers if r.subscribed_frames and r.subscribed_frames[0].offset < final)
    assert mid_stream >= SUBSCRIPTIONS // 2, f"only {mid_stream} subscriptions started before the pump ended"
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
