"""Subscribing, replacing, unsubscribing, and a slow application (bounded buffer, 1013, resume)."""

from __future__ import annotations

import anyio
import pytest

from starlette_replay import Cursor, Event, MemoryStore, Replay, allow_all
from starlette_replay.client import Backoff, ReplayClient

from .helpers import TIMEOUT, replay_app, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


async def test_unsubscribe_drops_the_topic() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("a")
            await client.subscribe("b")
            await replay.publish("a", "n", 1)
            await replay.publish("a", "n", 2)  # not read before the unsubscribe: dropped
            (first,) = await take(client, 1)
            await client.unsubscribe("a")
            await client.unsubscribe("a")  # nothing to do
            await replay.publish("a", "n", 3)
            await replay.publish("b", "n", 1)
            (second,) = await take(client, 1)
        assert client.topics == ["b"]
    assert isinstance(first, Event) and (first.topic, first.offset) == ("a", 1)
    assert isinstance(second, Event) and (second.topic, second.offset) == ("b", 1)


async def test_subscribing_again_with_a_cursor_replays_from_it() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            await replay.publish_many("t", [("n", i) for i in range(3)])
            first = await take(client, 3)
            epoch = first[0].epoch if isinstance(first[0], Event) else ""
            await client.subscribe("t", cursor=Cursor(epoch, 1))
            again = await take(client, 2)
            await client.subscribe("t")  # held already, no cursor: nothing changes
            await replay.publish("t", "n", 3)
            last = await take(client, 1)
    assert [i.offset for i in first + again + last if isinstance(i, Event)] == [1, 2, 3, 2, 3, 4]


async def test_rewind_replays_the_last_events_of_a_fresh_subscription() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        await replay.publish_many("t", [("n", i) for i in range(10)])
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t", rewind=3)
            items = await take(client, 3)
    assert [i.offset for i in items if isinstance(i, Event)] == [8, 9, 10]


async def test_slow_application_is_closed_1013_and_resumes_exactly_once() -> None:
    """The client stops reading when its buffer is full; the server's queue overflows (1013); the client
    reconnects from the last event it queued and the application still sees every event once, in order."""
    replay = Replay(MemoryStore(), authorize=allow_all, send_queue_size=4)
    payload = "x" * 60_000
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(
            url(port),
            buffer_size=2,
            backoff=FAST,
            connect_options={"compression": None, "max_queue": 2},
        ) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            for i in range(120):  # about 7 MB while nobody reads
                await replay.publish("t", "big", {"i": i, "pad": payload})
            items = await take(client, 120)
    assert [i.offset for i in items if isinstance(i, Event)] == list(range(1, 121))
    assert client.connections >= 2  # it was closed as slow at least once
