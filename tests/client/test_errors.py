"""Error frames reach the application as typed exceptions; retryable ones are retried."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from starlette.websockets import WebSocket

from starlette_replay import CloseCode, ErrorCode, Event, MemoryStore, Replay, allow_all
from starlette_replay.client import (
    Backoff,
    BadRequestError,
    ForbiddenError,
    InternalServerError,
    NotSubscribedError,
    RateLimitedError,
    ReplayClient,
    ServerError,
    TooManySubscriptionsError,
    UnavailableError,
)

from .helpers import TIMEOUT, FakeServer, Peer, abort_all, replay_app, serve, take, url

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.01, max=0.05)


def no_secrets(websocket: WebSocket, topic: str) -> bool:
    return not topic.startswith("secret")


def test_every_error_code_has_its_exception() -> None:
    classes = {
        ErrorCode.BAD_REQUEST: BadRequestError,
        ErrorCode.FORBIDDEN: ForbiddenError,
        ErrorCode.TOO_MANY_SUBSCRIPTIONS: TooManySubscriptionsError,
        ErrorCode.NOT_SUBSCRIBED: NotSubscribedError,
        ErrorCode.RATE_LIMITED: RateLimitedError,
        ErrorCode.UNAVAILABLE: UnavailableError,
        ErrorCode.INTERNAL: InternalServerError,
    }
    assert set(classes) == set(ErrorCode)
    for code, cls in classes.items():
        error = ServerError.from_frame(code.value, "msg", "t", 7)
        assert type(error) is cls
        assert (error.code, error.message, error.topic, error.ref) == (code.value, "msg", "t", 7)
    future = ServerError.from_frame("a_code_from_the_future", "msg", None, None)
    assert type(future) is ServerError and future.code == "a_code_from_the_future"


async def test_forbidden_subscribe_raises_and_the_rest_goes_on() -> None:
    replay = Replay(MemoryStore(), authorize=no_secrets)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(ForbiddenError) as info:
                await client.subscribe("secret:1")
            assert (info.value.code, info.value.topic) == ("forbidden", "secret:1")
            assert "not allowed" in info.value.message
            assert "secret:1" not in client.topics
            await client.subscribe("public")
            await replay.publish("public", "n", 1)
            (item,) = await take(client, 1)
        assert isinstance(item, Event) and item.topic == "public"


async def test_too_many_subscriptions() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all, max_subscriptions=1)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("a")
            with pytest.raises(TooManySubscriptionsError) as info:
                await client.subscribe("b")
        assert info.value.topic == "b"
        assert client.topics == ["a"]


async def test_refusal_nobody_waits_for_is_raised_by_the_iterator() -> None:
    replay = Replay(MemoryStore(), authorize=no_secrets)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("public")
            await client.subscribe("secret", wait=False)
            with pytest.raises(ForbiddenError):
                await client.__anext__()
            # The iteration goes on after it.
            await replay.publish("public", "n", 1)
            (item,) = await take(client, 1)
        assert isinstance(item, Event)


async def test_refusal_after_a_reconnect_reaches_the_app() -> None:
    """The identity lost its right to a topic while disconnected: the resubscribe is refused."""
    allowed = {"a", "b"}

    def authorize(websocket: WebSocket, topic: str) -> bool:
        return topic in allowed

    replay = Replay(MemoryStore(), authorize=authorize)
    async with serve(replay_app(replay)) as port, ReplayClient(url(port), backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("a")
            await client.subscribe("b")
            await replay.publish("b", "n", 1)
            (first,) = await take(client, 1)
            allowed.discard("b")
            abort_all(replay, CloseCode.SERVICE_RESTART)
            with pytest.raises(ForbiddenError) as info:
                await client.__anext__()
            assert info.value.topic == "b"
            assert client.topics == ["a"]
            await replay.publish("a", "n", 2)
            (second,) = await take(client, 1)
        assert isinstance(first, Event) and first.topic == "b"
        assert isinstance(second, Event) and second.topic == "a"


async def test_on_error_receives_refusals_instead_of_the_iterator() -> None:
    errors: list[ServerError] = []
    replay = Replay(MemoryStore(), authorize=no_secrets)
    async with (
        serve(replay_app(replay)) as port,
        ReplayClient(url(port), topics=["secret", "public"], on_error=errors.append, backoff=FAST) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("public")
            await replay.publish("public", "n", 1)
            (item,) = await take(client, 1)
    assert isinstance(item, Event)
    assert [(type(e), e.topic) for e in errors] == [(ForbiddenError, "secret")]


async def test_unavailable_subscribe_is_retried_with_backoff() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept()
        for _ in range(2):
            request = await peer.recv()
            await peer.send(type="error", code="unavailable", message="store down", topic="t", ref=request["ref"])
        request = await peer.recv()
        await peer.subscribed(request, "e1", 1, replayed=1)
        await peer.event("t", 1)
        await peer.until_closed()

    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await anyio.lowlevel.checkpoint()

    errors: list[ServerError] = []
    fake = FakeServer(script)
    backoff = Backoff(initial=0.5, max=4.0)
    async with (
        serve(fake.app) as port,
        ReplayClient(url(port), on_error=errors.append, backoff=backoff, rng=lambda: 0.5, sleep=sleep) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")  # waits through the refusals
            (item,) = await take(client, 1)
    assert not fake.errors
    assert isinstance(item, Event) and item.offset == 1
    assert delays == [0.25, 0.5]
    assert [type(e) for e in errors] == [UnavailableError, UnavailableError]
    assert len(fake.peers) == 1


async def test_replies_without_the_ref_of_our_frame_answer_nothing() -> None:
    """protocol.md: the server echoes a frame's ref "on the reply or error for that frame". Every frame
    the client sends has a ref, so a reply or refusal without one answers none of them: a ref-less
    ``subscribed`` is not taken as the subscription's position, and a ref-less ``rate_limited``
    makes the client send nothing again (it used to resubscribe and re-ack everything)."""

    async def script(peer: Peer) -> None:
        await peer.accept()
        request = await peer.recv()
        stale = {"topic": "t", "epoch": "other", "offset": 9, "replayed": 0}
        await peer.send(type="subscribed", resumed=True, recovered=False, **stale)
        await peer.send(type="error", code="rate_limited", message="dropped")
        await peer.subscribed(request, "e1", 0)
        await peer.event("t", 1)
        await peer.until_closed()

    errors: list[ServerError] = []
    fake = FakeServer(script)
    async with serve(fake.app) as port, ReplayClient(url(port), on_error=errors.append, backoff=FAST) as client:
        with anyio.fail_after(TIMEOUT):
            await client.subscribe("t")
            (item,) = await take(client, 1)
    assert isinstance(item, Event) and (item.topic, item.epoch, item.offset) == ("t", "e1", 1)
    assert [(type(e), e.ref) for e in errors] == [(RateLimitedError, None)]
    assert [f["type"] for f in fake.peers[0].received] == ["subscribe"]
