"""A crashed server (SIGKILL) restarted on its port: clients see 1006, come back, and learn what was lost."""

from __future__ import annotations

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, abort_all, open_socket
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "news"


async def test_sigkill_then_restart_resume_reports_the_lost_history(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers()
    clients = [Subscriber(server.ws_url(), [TOPIC], name=f"c{n}", expect_recovered=False, rewind=0) for n in range(4)]
    try:
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
                for client in clients:
                    await client.connect()
                    assert isinstance(await client.recv(), Subscribed)
                old = (await http.post("/publish", json={"topic": TOPIC, "count": 5, "tag": "old"})).json()
                for client in clients:
                    await client.read_until({TOPIC: 5})

                server.kill()
                for client in clients:
                    with pytest.raises(ConnectionClosed):
                        await client.recv()
                    assert client.server_closes == [(None, "")]  # no close frame: 1006
                    client.abort()
                with pytest.raises(OSError):
                    await open_socket(server.ws_url())

                await server.astart()
                new = (await http.post("/publish", json={"topic": TOPIC, "count": 2, "tag": "new"})).json()
                assert new["epoch"] != old["epoch"] and new["last"] == 2
                for client in clients:
                    await client.connect()
                    frame = await client.recv()
                    assert isinstance(frame, Subscribed)
                    assert (frame.epoch, frame.offset, frame.resumed, frame.recovered, frame.replayed) == (
                        new["epoch"],
                        2,
                        True,
                        False,
                        2,
                    )
                    await client.read_until({TOPIC: 2})
                    await client.drop()
    finally:
        abort_all(clients)

    for client in clients:
        assert client.violations == []
        got = [(d.epoch, d.offset, d.data["tag"]) for d in client.delivered[TOPIC]]
        assert got == [(old["epoch"], n, "old") for n in range(1, 6)] + [(new["epoch"], n, "new") for n in (1, 2)]
