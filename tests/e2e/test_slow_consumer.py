"""A slow consumer is closed with 1013 without holding back the others, then resumes losslessly."""

from __future__ import annotations

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, abort_all, assert_exact
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "flood"
SEND_QUEUE = 160
EVENTS = 500
PAYLOAD = 16_000  # bytes of padding per event: ~8 MB in all, more than the socket buffers hold


async def test_slow_consumer_closed_1013_others_keep_up_then_it_resumes(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env={**store_env, "REPLAY_SEND_QUEUE_SIZE": SEND_QUEUE, "REPLAY_CLOSE_TIMEOUT": 15})
    # The slow one: no compression (repeated padding would shrink to nothing), a tiny kernel receive
    # buffer, and websockets stops reading the socket once one message waits unread.
    slow = Subscriber(server.ws_url(), [TOPIC], name="slow", socket_options={"rcvbuf": 4096, "max_queue": 1})
    fast = Subscriber(server.ws_url(), [TOPIC], name="fast")
    try:
        with anyio.fail_after(45):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=40.0) as http:
                for client in (slow, fast):
                    await client.connect()
                    assert isinstance(await client.recv(), Subscribed)
                # Steady flooding: a live queue never holds more than a few frames for a reader that keeps up.
                pump = (
                    await http.post(
                        "/pump", json={"topics": [TOPIC], "count": EVENTS, "interval": 0.003, "size": PAYLOAD}
                    )
                ).json()
                await fast.read_until({TOPIC: EVENTS})
                published = (await http.post(f"/pump/{pump['id']}/wait")).json()
                assert published[TOPIC]["last"] == EVENTS

                # The slow client reads again: what was in the pipes, then the close.
                with pytest.raises(ConnectionClosed):
                    await slow.read_until({TOPIC: EVENTS})
                got_before_close = slow.offset(TOPIC)
                assert slow.server_closes == [(1013, "slow consumer")]
                await slow.drop()

                # It resumes from its cursor and gets the rest.
                await slow.connect()
                resumed = await slow.recv()
                assert isinstance(resumed, Subscribed)
                assert (resumed.resumed, resumed.recovered) == (True, True)
                assert resumed.replayed == EVENTS - got_before_close
                await slow.read_until({TOPIC: EVENTS})
                await slow.drop()
                await fast.drop()
                stats = (await http.get("/stats")).json()
    finally:
        abort_all([slow, fast])

    print(f"the slow consumer had {got_before_close} of {EVENTS} events when it was closed")
    assert got_before_close < EVENTS - SEND_QUEUE
    assert fast.server_closes == []
    assert_exact([slow, fast], {TOPIC: (published[TOPIC]["epoch"], EVENTS)})
    assert [d.data["i"] for d in slow.delivered[TOPIC]] == list(range(EVENTS))
    assert stats["queued_frames"] == 0
