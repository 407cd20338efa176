"""Network faults between the store and Redis, made by a TCP proxy.

A reply lost after Redis ran the append: the proxy cuts a connection right
after Redis answered an EVALSHA, so the store sees a dropped connection for a
script that did run. Without an idempotency key the store must not retry it
(that would store the events twice) and says it does not know; with a key the
retry is safe and returns the events stored the first time.

A silent link: the proxy stops forwarding on the pub/sub connection without
closing it (a half-open TCP connection, a dead NAT entry). The listener's pings
go unanswered, it reconnects and repairs.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
import redis.asyncio

from starlette_replay import RedisStore, StoreUnavailable
from tests.redis_server import RecordingSink, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


class ReplyCutter:
    """Forwards TCP to Redis.

    ``arm()`` makes it cut the next connection that sends an EVALSHA, once
    answered; ``freeze_pubsub()`` makes every connection that subscribed go
    silent (nothing forwarded either way, nothing closed).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.cuts = 0
        self.subscribers: set[int] = set()  # ids of connections that sent a SUBSCRIBE
        self.frozen: set[int] = set()

    def arm(self) -> None:
        self.armed = True

    def freeze_pubsub(self) -> None:
        """Silence the pub/sub connections open now, for good (later ones work)."""
        self.frozen |= self.subscribers

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.port) as upstream:
            doomed = False
            me = id(client)
            gone = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)

            async def requests() -> None:
                nonlocal doomed
                try:
                    async for chunk in client:
                        if self.armed and b"EVALSHA" in chunk:
                            self.armed, doomed = False, True
                        if b"SUBSCRIBE" in chunk:
                            self.subscribers.add(me)
                        if me not in self.frozen:
                            await upstream.send(chunk)
                except gone:
                    pass  # either side went away: so does this connection
                tg.cancel_scope.cancel()

            async def replies() -> None:
                try:
                    async for chunk in upstream:
                        if doomed:
                            self.cuts += 1  # Redis ran it; the store never hears back
                            break
                        if me not in self.frozen:
                            await client.send(chunk)
                except gone:
                    pass
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(requests)
                tg.start_soon(replies)


@asynccontextmanager
async def through_cutter(
    server: RedisServer, **options: float
) -> AsyncIterator[tuple[RedisStore, RecordingSink, ReplyCutter]]:
    cutter = ReplyCutter(server.port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    client = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_timeout=3)
    options.setdefault("publish_timeout", 3)
    store = RedisStore(client, prefix=f"cut{secrets.token_hex(4)}", **options)
    sink = RecordingSink()
    try:
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(cutter.serve, listener)
            async with store.connect(sink):
                yield store, sink, cutter
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()


async def test_without_a_key_a_lost_reply_is_not_retried_and_not_claimed(redis_server: RedisServer) -> None:
    async with through_cutter(redis_server) as (store, sink, cutter):
        await store.subscribe("t")
        await store.append("warm", [("e", "0")])  # the script is loaded: the EVALSHA below runs it
        cutter.arm()
        with pytest.raises(StoreUnavailable, match="may or may not"):
            await store.append("t", [("e", "1")])
        assert cutter.cuts == 1
        # it was stored once (not twice by a blind retry), and delivered as stored
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        assert (await store.position("t")).head == 1
        assert await store.read("t", 0, 10) == sink.of("t")


async def test_with_a_key_a_lost_reply_is_retried_safely(redis_server: RedisServer) -> None:
    async with through_cutter(redis_server) as (store, sink, cutter):
        await store.subscribe("t")
        await store.append("warm", [("e", "0")])  # the script is loaded: the EVALSHA below runs it
        cutter.arm()
        (event,) = await store.append("t", [("e", "1")], idempotency_key="once")
        assert cutter.cuts == 1
        assert event.offset == 1
        assert (await store.position("t")).head == 1
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        assert sink.of("t") == [event]


async def test_a_silent_pubsub_link_is_noticed_reopened_and_repaired(redis_server: RedisServer) -> None:
    async with through_cutter(redis_server, health_check_interval=0.2) as (store, sink, cutter):
        await store.subscribe("t")
        first = await store.append("t", [("e", "0")])
        await sink.wait_for(lambda: len(sink.of("t")) == 1)
        reconnects = store.reconnects
        cutter.freeze_pubsub()
        published = first + await store.append("t", [("e", str(i)) for i in range(1, 6)])
        await sink.wait_for(lambda: len(sink.of("t")) == 6)
        assert sink.of("t") == published
        assert store.reconnects == reconnects + 1
        assert sink.resets == []
