"""A long replay to a slow reader is paced by its socket: no 1013, however far behind it is."""

from __future__ import annotations

import anyio
import httpx
import pytest

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, abort_all, assert_exact, wait_for_stats
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "backlog"
SEND_QUEUE = 8
BACKLOG = 1000
PAYLOAD = 4000  # ~4 MB of history: far more than the socket buffers hold
LIVE = 3  # published during the replay: fewer than SEND_QUEUE, so they may wait


async def test_replay_of_a_long_backlog_to_a_stalled_reader_is_not_a_slow_consumer(
    uvicorn_servers: ServerFactory,
) -> None:
    server = uvicorn_servers(env={"REPLAY_SEND_QUEUE_SIZE": SEND_QUEUE, "REPLAY_PAGE_SIZE": 100})
    reader = Subscriber(server.ws_url(), [TOPIC], name="reader", socket_options={"rcvbuf": 4096, "max_queue": 1})
    try:
        with anyio.fail_after(40):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
                for _ in range(BACKLOG // 100):
                    await http.post("/publish", json={"topic": TOPIC, "count": 100, "size": PAYLOAD, "batch": True})
                epoch = (await http.get("/position", params={"topic": TOPIC})).json()["epoch"]
                reader.cursors[TOPIC] = (epoch, 0)
                await reader.connect()
                # The reader does not read while the server has more than SEND_QUEUE frames queued for it.
                stats = await wait_for_stats(
                    http, lambda stats: stats["queued_frames"] > SEND_QUEUE or stats["connections"] == 0
                )
                assert stats["connections"] == 1, "the reader was closed while the replay waited for it"
                live = (await http.post("/publish", json={"topic": TOPIC, "count": LIVE, "tag": "live"})).json()
                assert live["last"] == BACKLOG + LIVE
                assert (await http.get("/stats")).json()["connections"] == 1
                subscribed = await reader.recv()
                assert isinstance(subscribed, Subscribed)
                assert (subscribed.offset, subscribed.replayed) == (BACKLOG, BACKLOG)
                await reader.read_until({TOPIC: BACKLOG + LIVE})
                await reader.drop()
    finally:
        abort_all([reader])

    assert reader.server_closes == []
    assert_exact([reader], {TOPIC: (epoch, BACKLOG + LIVE)})
    assert [d.data["tag"] for d in reader.delivered[TOPIC][-LIVE:]] == ["live"] * LIVE
