"""TokenStream: tokens published as fewer events while the store is busy, always in order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import starlette_replay.streams as streams
from starlette_replay import Event, MemoryStore, Replay, StoreUnavailable
from starlette_replay.streams import TokenStream, text_delta

pytestmark = pytest.mark.anyio

TOPIC = "conv:1"


@pytest.fixture
async def replay() -> AsyncIterator[Replay]:
    async with Replay(MemoryStore()) as running:
        yield running


class GatedPublisher:
    """Publishes through a Replay, each publish waiting for the test to open the gate: a store that is busy."""

    def __init__(self, replay: Replay) -> None:
        self.replay = replay
        self.gate = anyio.Event()
        self.entered = anyio.Event()  # set when a publish is waiting at the gate
        self.calls = 0
        self.fail_at: int | None = None

    async def publish(self, topic: str, event_type: str, data: Any, *, idempotency_key: str | None = None) -> Event:
        self.calls += 1
        self.entered.set()
        await self.gate.wait()
        if self.calls == self.fail_at:
            raise StoreUnavailable("the store went away")
        return await self.replay.publish(topic, event_type, data, idempotency_key=idempotency_key)


def texts(events: Sequence[Event]) -> list[str]:
    return [e.data["text"] for e in events]


async def test_each_token_is_an_event_when_the_store_keeps_up(replay: Replay) -> None:
    tokens = [f" t{i}" for i in range(30)]
    with anyio.fail_after(5):
        async with TokenStream(replay, TOPIC) as stream:
            for token in tokens:
                await stream.send(token)
                await wait_all_tasks_blocked()  # the previous publish is done before the next token
    events = await replay.history(TOPIC)
    assert texts(events) == tokens
    assert [(e.data["seq"], e.data["count"]) for e in events] == [(i, 1) for i in range(30)]
    assert (stream.events, stream.tokens) == (30, 30)


async def test_tokens_that_arrive_during_a_publish_go_out_together_in_order(replay: Replay) -> None:
    publisher = GatedPublisher(replay)
    with anyio.fail_after(5):
        async with TokenStream(publisher, TOPIC) as stream:
            await stream.send("A")
            await publisher.entered.wait()  # the first publish holds "A" and waits for the store
            for token in "BCDEFGHIJK":
                await stream.send(token)
            publisher.gate.set()
    events = await replay.history(TOPIC)
    assert texts(events) == ["A", "BCDEFGHIJK"]
    assert [(e.data["seq"], e.data["count"]) for e in events] == [(0, 1), (1, 10)]
    assert [e.offset for e in events] == [1, 2]


async def test_max_tokens_bounds_an_event(replay: Replay) -> None:
    publisher = GatedPublisher(replay)
    with anyio.fail_after(5):
        async with TokenStream(publisher, TOPIC, max_tokens=4) as stream:
            await stream.send("a")
            await publisher.entered.wait()
            for token in "bcdefghij":
                await stream.send(token)
            publisher.gate.set()
    assert texts(await replay.history(TOPIC)) == ["a", "bcde", "fghi", "j"]


async def test_a_full_buffer_makes_send_wait_for_the_store(replay: Replay) -> None:
    publisher = GatedPublisher(replay)
    sent = anyio.Event()
    with anyio.fail_after(5):
        async with TokenStream(publisher, TOPIC, max_buffered=3) as stream:
            await stream.send("a")
            await publisher.entered.wait()
            for token in "bcd":
                await stream.send(token)

            async def one_more() -> None:
                await stream.send("e")
                sent.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(one_more)
                await wait_all_tasks_blocked()
                assert not sent.is_set(), "send waits while max_buffered tokens are waiting"
                publisher.gate.set()
    assert sent.is_set()
    assert "".join(texts(await replay.history(TOPIC))) == "abcde"


async def test_a_failed_publish_is_raised_from_the_block_and_from_send(replay: Replay) -> None:
    publisher = GatedPublisher(replay)
    publisher.fail_at = 2
    publisher.gate.set()
    reached_send_after_failure = False
    with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="went away"):
        async with TokenStream(publisher, TOPIC) as stream:
            await stream.send("a")
            await wait_all_tasks_blocked()
            await stream.send("b")
            await wait_all_tasks_blocked()  # the second publish fails: this task is cancelled here
            reached_send_after_failure = True
    assert not reached_send_after_failure
    assert texts(await replay.history(TOPIC)) == ["a"]
    with pytest.raises(RuntimeError, match="outside"):
        await stream.send("c")


async def test_an_error_in_the_producer_is_raised_as_itself(replay: Replay) -> None:
    with anyio.fail_after(5), pytest.raises(KeyError):
        async with TokenStream(replay, TOPIC) as stream:
            await stream.send("a")
            raise KeyError("the model failed")


async def test_a_custom_event_shape(replay: Replay) -> None:
    def make(tokens: Sequence[tuple[str, int]], first: int) -> dict[str, Any]:
        return {"from": first, "text": "".join(t for t, _ in tokens), "logprobs": [p for _, p in tokens]}

    publisher = GatedPublisher(replay)
    with anyio.fail_after(5):
        async with TokenStream(publisher, TOPIC, "delta", make=make) as stream:
            await stream.send(("x", -1))
            await publisher.entered.wait()
            await stream.send(("y", -2))
            await stream.send(("z", -3))
            publisher.gate.set()
    events = await replay.history(TOPIC)
    assert [(e.event, e.data) for e in events] == [
        ("delta", {"from": 0, "text": "x", "logprobs": [-1]}),
        ("delta", {"from": 1, "text": "yz", "logprobs": [-2, -3]}),
    ]


async def test_min_interval_caps_the_event_rate(replay: Replay) -> None:
    tokens = 0
    with anyio.fail_after(5):
        async with TokenStream(replay, TOPIC, min_interval=0.05) as stream:
            started = anyio.current_time()
            while anyio.current_time() - started < 0.3:
                await stream.send(".")
                tokens += 1
                await anyio.sleep(0.001)
    events = await replay.history(TOPIC, limit=1000)
    assert "".join(texts(events)) == "." * tokens
    # at most one event per 50 ms (and the last one on leaving): far fewer events than tokens
    assert len(events) <= 0.3 / 0.05 + 2 < tokens


def test_options_are_checked() -> None:
    replay = Replay()
    with pytest.raises(ValueError, match="max_tokens"):
        TokenStream(replay, TOPIC, max_tokens=0)
    with pytest.raises(ValueError, match="min_interval"):
        TokenStream(replay, TOPIC, min_interval=-1)
    with pytest.raises(ValueError, match="max_buffered"):
        TokenStream(replay, TOPIC, max_buffered=0)


async def test_send_outside_the_block_and_a_second_entry_are_refused(replay: Replay) -> None:
    stream: TokenStream[str] = TokenStream(replay, TOPIC)
    with pytest.raises(RuntimeError, match="outside"):
        await stream.send("a")
    async with stream:
        pass
    with pytest.raises(RuntimeError, match="once"):
        await stream.__aenter__()


def test_text_delta_and_exports() -> None:
    assert text_delta(["a", "b"], 7) == {"seq": 7, "count": 2, "text": "ab"}
    assert set(streams.__all__) == {"Publishes", "TokenStream", "text_delta"}
    assert "buffered=0" in repr(TokenStream(Replay(), TOPIC))


async def test_a_publish_that_fails_while_leaving_the_block_is_raised(replay: Replay) -> None:
    publisher = GatedPublisher(replay)
    publisher.fail_at = 1
    publisher.gate.set()
    with anyio.fail_after(5), pytest.raises(StoreUnavailable):
        async with TokenStream(publisher, TOPIC) as stream:
            await stream.send("a")  # published (and failing) only after the body is done
    assert await replay.history(TOPIC) == []
    assert (stream.events, stream.tokens) == (0, 0)


async def test_cancelling_the_producer_ends_the_stream_without_waiting_for_the_store(replay: Replay) -> None:
    publisher = GatedPublisher(replay)  # the gate never opens: a store that hangs
    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async with TokenStream(publisher, TOPIC) as stream:
                await stream.send("a")
                await publisher.entered.wait()
                await stream.send("b")
                scope.cancel()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert (stream.events, stream.tokens) == (0, 0)
