"""Fan-out to many sockets at once: every client gets every event, once, in order."""

from __future__ import annotations

import anyio
import httpx
import pytest

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, abort_all, assert_exact, wait_for_stats
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CLIENTS = 100
EVENTS = 100
TOPICS = ["fan:a", "fan:b"]


async def test_many_clients_each_get_every_event_once(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env=store_env)
    clients = [Subscriber(server.ws_url(), [TOPICS[n % 2]], name=f"c{n}", rewind=0) for n in range(CLIENTS)]
    try:
        with anyio.fail_after(40):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
                for client in clients:
                    await client.connect()
                for client in clients:
                    assert isinstance(await client.recv(), Subscribed)
                stats = (await http.get("/stats")).json()
                assert (stats["connections"], stats["subscriptions"], stats["topics"]) == (CLIENTS, CLIENTS, 2)
                pump = (await http.post("/pump", json={"topics": TOPICS, "count": EVENTS, "interval": 0.001})).json()
                published = (await http.post(f"/pump/{pump['id']}/wait")).json()
                async with anyio.create_task_group() as tg:
                    for client in clients:
                        tg.start_soon(client.read_until, {client.topics[0]: EVENTS})
                for client in clients:
                    await client.drop()
                stats = await wait_for_stats(http, lambda stats: stats["connections"] == 0)
    finally:
        abort_all(clients)
    assert_exact(clients, {topic: (published[topic]["epoch"], published[topic]["last"]) for topic in TOPICS})
    assert all(client.server_closes == [] for client in clients)
    assert stats == {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}
