"""The harness itself: a uvicorn process starts, serves, publishes, restarts on its port, dies on demand."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_start_publish_restart_kill(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_HISTORY_SIZE": 50})
    port = server.port
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        health = (await http.get("/health")).json()
        assert "MemoryStore(history_size=50" in health["store"]
        published = (await http.post("/publish", json={"topic": "a", "count": 3})).json()
        assert (published["first"], published["last"]) == (1, 3)
        history = (await http.get("/history", params={"topic": "a"})).json()
        assert [(e["offset"], e["data"]["i"]) for e in history] == [(1, 0), (2, 1), (3, 2)]
        assert (await http.get("/stats")).json() == {
            "connections": 0,
            "sse_streams": 0,
            "subscriptions": 0,
            "topics": 0,
            "queued_frames": 0,
        }
        pump = (await http.post("/pump", json={"topics": ["a", "b"], "count": 5})).json()
        done = (await http.post(f"/pump/{pump['id']}/wait")).json()
        assert (done["a"]["last"], done["b"]["last"]) == (8, 5)

        await server.arestart()
        assert server.port == port
        assert server.starts == 2
        # a memory store forgets everything with its process: a new epoch, offsets from 1
        position = (await http.get("/position", params={"topic": "a"})).json()
        assert position["head"] == 0
        assert position["epoch"] != published["epoch"]

    server.kill()
    assert not server.running
    assert "killed (SIGKILL)" in server.log_text()
    assert "Application startup complete" in server.log_text()
