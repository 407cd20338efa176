"""A crashed server (SIGKILL) restarted on its port: clients see 1006, come back, and learn what was lost."""

from __future__ import annotations

import signal

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


async def test_sigterm_with_a_stalled_client_still_exits(uvicorn_servers: ServerFactory) -> None:
    """A client that stopped reading cannot hold the server up past uvicorn's graceful timeout.

    (uvicorn logs an ERROR there: the stalled socket's close frame cannot be
    flushed, so it gives up on the connection once the graceful timeout is over.)
    """
    server = uvicorn_servers(env={"REPLAY_SEND_QUEUE_SIZE": 100_000}, graceful_timeout=2, allow_errors=True)
    stalled = Subscriber(server.ws_url(), [TOPIC], name="stalled", socket_options={"rcvbuf": 4096, "max_queue": 1})
    try:
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
                await stalled.connect()
                assert isinstance(await stalled.recv(), Subscribed)
                for _ in range(5):
                    await http.post("/publish", json={"topic": TOPIC, "count": 100, "size": 16_000})
                stats = (await http.get("/stats")).json()
                assert stats["queued_frames"] > 0  # the writer is stuck on the stalled socket
            server.terminate()
            started = anyio.current_time()
            assert await server.await_exit(within=15) in (0, -signal.SIGTERM)
            assert anyio.current_time() - started < 2 + 5
    finally:
        abort_all([stalled])
    log = server.log_text()
    assert "Application shutdown complete" in log
    assert [line for line in server.log_errors() if "timeout graceful shutdown exceeded" not in line] == []
