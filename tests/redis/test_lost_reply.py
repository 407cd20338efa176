"""A reply lost after Redis ran the append: no duplicate, and no lie.

A TCP proxy between the store and Redis cuts a connection right after Redis
answered an EVALSHA, so the store sees a dropped connection for a script that
did run. Without an idempotency key the store must not retry it (that would
store the events twice) and says it does not know; with a key the retry is
safe and returns the events stored the first time.
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
    """Forwards TCP to Redis; ``arm()`` makes it cut the next connection that sends an EVALSHA, once answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.cuts = 0

    def arm(self) -> None:
        self.armed = True

    async def serve(self, listener: anyio.abc.SocketListener) -> None:
        await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.port) as upstream:
            doomed = False
            gone = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)

            async def requests() -> None:
                nonlocal doomed
                try:
                    async for chunk in client:
                        if self.armed and b"EVALSHA" in chunk:
                            self.armed, doomed = False, True
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
                        await client.send(chunk)
                except gone:
                    pass
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(requests)
                tg.start_soon(replies)


@asynccontextmanager
async def through_cutter(server: RedisServer) -> AsyncIterator[tuple[RedisStore, RecordingSink, ReplyCutter]]:
    cutter = ReplyCutter(server.port)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    client = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_timeout=3)
    store = RedisStore(client, prefix=f"cut{secrets.token_hex(4)}", publish_timeout=3)
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
