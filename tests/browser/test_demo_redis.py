"""Two instances of the demo on one Redis share one history: `REDIS_URL=... python -m example_app` twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from example_app.app import plan_answer, split_tokens
from tests.browser.conftest import DemoServer
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(params=[50.0])
def two_demos(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[DemoServer, DemoServer]]:
    redis_server.client().flushall()
    rate = request.param
    a = DemoServer(tmp_path, agent_delay=0.3, redis_url=redis_server.url, token_rate=rate)
    b = DemoServer(tmp_path, agent_delay=0.3, redis_url=redis_server.url, token_rate=rate)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()


async def test_a_message_sent_to_one_instance_is_answered_live_on_the_other(
    two_demos: tuple[DemoServer, DemoServer],
) -> None:
    a, b = two_demos
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as http_a:
        await http_a.get("/")  # sets the uid cookie
        uid = http_a.cookies["uid"]
        ws_url = b.url.replace("http://", "ws://") + "/ws"
        with anyio.fail_after(20):
            async with connect(ws_url, additional_headers={"Cookie": f"uid={uid}"}, compression=None) as ws:
                await ws.send(json.dumps({"type": "subscribe", "topic": f"user:{uid}"}))
                subscribed = json.loads(await ws.recv())
                assert (subscribed["type"], subscribed["offset"]) == ("subscribed", 0)
                sent = await http_a.post("/api/messages", json={"text": "Euljiro, 2 people", "client_id": "m1"})
                assert sent.status_code == 202
                # the message and the agent's whole answer, published on A, arrive live on B, in order
                frames = []
                while not frames or frames[-1]["event"] != "task_interaction" or len(frames) < 3:
                    frame = json.loads(await ws.recv())
                    assert frame["type"] == "event", frame
                    frames.append(frame)
                assert [f["offset"] for f in frames] == list(range(1, len(frames) + 1))
                assert frames[0]["event"] == "user_message"
        # both instances serve the same stored history
        async with httpx.AsyncClient(base_url=b.url, timeout=10, cookies={"uid": uid}) as http_b:
            history_a = (await http_a.get("/api/history")).json()
            history_b = (await http_b.get("/api/history")).json()
    assert history_a["cursor"] == history_b["cursor"]
    assert history_a["events"] == history_b["events"]
    assert [e["offset"] for e in history_b["events"]][: len(frames)] == [f["offset"] for f in frames]


@pytest.mark.parametrize("two_demos", [10.0], indirect=True)
async def test_a_stop_sent_to_the_other_instance_stops_the_agent(two_demos: tuple[DemoServer, DemoServer]) -> None:
    """The stop is a stored event, read by the agent from Redis: it works whichever instance takes it."""
    a, b = two_demos
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as http_a:
        await http_a.get("/")
        uid = http_a.cookies["uid"]
        ws_url = a.url.replace("http://", "ws://") + "/ws"
        with anyio.fail_after(30):
            async with connect(ws_url, additional_headers={"Cookie": f"uid={uid}"}, compression=None) as ws:
                await ws.send(json.dumps({"type": "subscribe", "topic": f"user:{uid}"}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
                sent = await http_a.post("/api/messages", json={"text": "Euljiro, 2 people", "client_id": "m1"})
                assert sent.status_code == 202
                deltas = 0
                while deltas < 3:
                    frame = json.loads(await ws.recv())
                    deltas += frame.get("event") == "answer_delta"
                async with httpx.AsyncClient(base_url=b.url, timeout=10, cookies={"uid": uid}) as http_b:
                    assert (await http_b.post("/api/stop", json={"task_id": "m1"})).status_code == 202
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("event") == "task_interaction" and frame["data"]["state"] != "working":
                        break
    assert frame["data"]["state"] == "stopped"
    assert 3 <= frame["data"]["tokens"] < len(split_tokens(plan_answer("Euljiro, 2 people")[1]))
