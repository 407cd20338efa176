"""TokenStream on RedisStore: many concurrent streams, each stored in token order with no token lost."""

from __future__ import annotations

import secrets

import anyio
import pytest

from starlette_replay import RedisStore, Replay
from starlette_replay.streams import TokenStream
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_concurrent_streams_keep_their_order_on_redis(redis_server: RedisServer) -> None:
    prefix = f"t-{secrets.token_hex(4)}"
    streams, per_stream = 50, 200
    counts: dict[str, tuple[int, int]] = {}
    async with Replay(RedisStore.from_url(redis_server.url, prefix=prefix)) as replay:

        async def produce(i: int) -> None:
            topic = f"conv:{i}"
            async with TokenStream(replay, topic) as stream:
                for n in range(per_stream):
                    await stream.send(f"{i}.{n} ")
                    if n % 7 == 0:
                        await anyio.lowlevel.checkpoint()  # let the other producers and the flusher run
            counts[topic] = (stream.events, stream.tokens)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(streams):
                    tg.start_soon(produce, i)
            for i in range(streams):
                events = await replay.history(f"conv:{i}", limit=per_stream)
                assert "".join(e.data["text"] for e in events) == "".join(f"{i}.{n} " for n in range(per_stream))
                seqs = [(e.data["seq"], e.data["count"]) for e in events]
                assert [s for s, _ in seqs] == [sum(c for _, c in seqs[:k]) for k in range(len(seqs))], seqs
                assert counts[f"conv:{i}"] == (len(events), per_stream)
    # tokens sent while a publish was in flight shared an event
    assert sum(events for events, _ in counts.values()) < streams * per_stream
