"""The demo app's server side, in-process (no browser): cookie, authorization, snapshot, the agent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

import example_app.app as demo
from example_app import create_app
from starlette_replay import MemoryStore

pytestmark = pytest.mark.anyio

BASE = "http://demo.test"


@pytest.fixture
async def app() -> AsyncIterator[Starlette]:
    application = create_app(agent_delay=0.05, store=MemoryStore(), token_rate=1000)
    async with LifespanManager(application):
        yield application


@pytest.fixture
async def slow_app() -> AsyncIterator[Starlette]:
    """Tokens at 20/s: time to act in the middle of an answer."""
    application = create_app(agent_delay=0.05, store=MemoryStore(), token_rate=20)
    async with LifespanManager(application):
        yield application


def client(app: Starlette, uid: str | None = None) -> httpx.AsyncClient:
    # One transport per client: httpx-ws shares one scope among a transport's connections.
    cookies = {"uid": uid} if uid else None
    return httpx.AsyncClient(transport=ASGIWebSocketTransport(app), base_url=BASE, cookies=cookies)


async def new_user(app: Starlette) -> str:
    async with client(app) as http:
        response = await http.get("/")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    uid = response.cookies["uid"]
    assert "httponly" in response.headers["set-cookie"].lower()
    return uid


async def frames_until(ws: Any, done: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while not frames or not done(frames[-1]):
            frames.append(json.loads(await ws.receive_text()))
    return frames


def is_answer(frame: dict[str, Any]) -> bool:
    return frame.get("event") == "task_interaction" and frame["data"]["state"] in ("done", "stopped")


MESSAGE = "Euljiro, 2 people, tomorrow at 12:30"


async def test_page_sets_a_uid_cookie_once(app: Starlette) -> None:
    uid = await new_user(app)
    async with client(app, uid) as http:
        again = await http.get("/")
        js = await http.get("/replay.js")
    assert "set-cookie" not in again.headers
    assert js.status_code == 200 and "ReplayClient" in js.text


async def test_socket_needs_the_cookie_and_only_gets_its_own_topic(app: Starlette) -> None:
    async with client(app) as http:
        with pytest.raises(WebSocketDisconnect):
            async with aconnect_ws("/ws", http, subprotocols=["replay.v1"]):
                pass
    uid, other = await new_user(app), await new_user(app)
    async with client(app, uid) as http, aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
        await ws.send_text(json.dumps({"type": "subscribe", "topic": f"user:{other}", "ref": 1}))
        (refused,) = await frames_until(ws, lambda f: f["type"] == "error")
        assert (refused["code"], refused["ref"]) == ("forbidden", 1)
        await ws.send_text(json.dumps({"type": "subscribe", "topic": f"user:{uid}", "ref": 2}))
        (ok,) = await frames_until(ws, lambda f: f["type"] == "subscribed")
        assert (ok["topic"], ok["ref"], ok["offset"]) == (f"user:{uid}", 2, 0)


async def test_message_then_agent_answer_on_the_users_topic(app: Starlette) -> None:
    uid = await new_user(app)
    async with client(app, uid) as http, aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
        await ws.send_text(json.dumps({"type": "subscribe", "topic": f"user:{uid}"}))
        await frames_until(ws, lambda f: f["type"] == "subscribed")
        body = {"text": "Euljiro, 2 people, tomorrow at 12:30", "client_id": "m1"}
        first = await http.post("/api/messages", json=body)
        retried = await http.post("/api/messages", json=body)  # a retried POST: stored once, one agent run
        assert first.status_code == retried.status_code == 202
        assert first.json() == retried.json()
        frames = await frames_until(ws, is_answer)
        snapshot = (await http.get("/api/history")).json()

    _, answer = demo.plan_answer(MESSAGE)
    tokens = demo.split_tokens(answer)
    assert "".join(tokens) == answer and len(tokens) > 20
    assert [(f["offset"], f["event"]) for f in frames] == [
        (1, "user_message"),
        (2, "task_interaction"),
        (3, "agent_log"),
        (4, "agent_log"),
        (5, "agent_log"),
        (6, "agent_log"),
        (7, "answer_start"),
        *[(8 + i, "answer_delta") for i in range(len(tokens))],
        (8 + len(tokens), "task_interaction"),
    ]
    deltas = [f["data"] for f in frames if f["event"] == "answer_delta"]
    assert [d["seq"] for d in deltas] == list(range(len(tokens)))
    assert [d["text"] for d in deltas] == tokens
    final = frames[-1]["data"]
    assert (final["state"], final["text"], final["tokens"]) == ("done", answer, len(tokens))
    assert final["text"].startswith("Booked: a table for 2 at ")
    head = 8 + len(tokens)
    assert snapshot["topic"] == f"user:{uid}"
    assert snapshot["cursor"]["offset"] == head
    assert [e["offset"] for e in snapshot["events"]] == list(range(1, head + 1))
    assert {e["epoch"] for e in snapshot["events"]} == {snapshot["cursor"]["epoch"]}
    # The agent ran once: nothing came after its answer.
    assert len(snapshot["events"]) == head


async def test_stop_ends_the_answer_and_a_dropped_socket_does_not(slow_app: Starlette) -> None:
    """The agent sees the stop (a stored message), not the sockets: one socket closes mid-answer and the
    tokens go on; then Stop ends the answer, and its final marker holds exactly the tokens sent."""
    uid = await new_user(slow_app)
    async with client(slow_app, uid) as http:
        async with aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": f"user:{uid}"}))
            await frames_until(ws, lambda f: f["type"] == "subscribed")
            assert (await http.post("/api/messages", json={"text": MESSAGE, "client_id": "m1"})).status_code == 202
            first = await frames_until(ws, lambda f: f.get("event") == "answer_delta")
        # the socket is gone; the agent keeps streaming: tokens are stored while nobody listens
        cursor = first[-1]["offset"]
        async with aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": f"user:{uid}"}))  # stored cursor: none
            await frames_until(ws, lambda f: f["type"] == "subscribed")
            more = await frames_until(ws, lambda f: f.get("event") == "answer_delta" and f["offset"] >= cursor + 3)
            stop = await http.post("/api/stop", json={"task_id": "m1"})
            assert stop.status_code == 202
            again = await http.post("/api/stop", json={"task_id": "m1"})  # a retried stop is stored once
            assert again.json() == stop.json()
            rest = await frames_until(ws, is_answer)
        events = (await http.get("/api/history")).json()["events"]

    assert more[-1]["offset"] >= cursor + 3, "tokens went on after the first socket closed"
    final = rest[-1]["data"]
    assert final["state"] == "stopped"
    deltas = [e for e in events if e["event"] == "answer_delta"]
    _, answer = demo.plan_answer(MESSAGE)
    assert 0 < len(deltas) < len(demo.split_tokens(answer)), "stopped before the end"
    assert final["text"] == "".join(d["data"]["text"] for d in deltas)
    assert final["tokens"] == len(deltas)
    # the stop was seen at the first token after it was stored: at most one token follows it
    (stop_event,) = [e for e in events if e["event"] == "stop_requested"]
    assert sum(1 for d in deltas if d["offset"] > stop_event["offset"]) <= 1
    assert events[-1]["event"] == "task_interaction" and events[-1]["data"]["state"] == "stopped"


async def test_stop_needs_the_cookie_and_a_task_id(app: Starlette) -> None:
    async with client(app) as http:
        assert (await http.post("/api/stop", json={"task_id": "m1"})).status_code == 401
    uid = await new_user(app)
    async with client(app, uid) as http:
        assert (await http.post("/api/stop", json={"task_id": "has space"})).status_code == 400
        assert (await http.post("/api/stop", json=[1])).status_code == 400
        assert (await http.get("/api/history")).json()["events"] == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": "", "client_id": "a"}, 400),
        ({"text": "x" * 501, "client_id": "a"}, 400),
        ({"text": "hi", "client_id": "has space"}, 400),
        ({"text": "hi"}, 400),
        ([1, 2], 400),
    ],
)
async def test_bad_messages_are_refused(app: Starlette, body: Any, status: int) -> None:
    uid = await new_user(app)
    async with client(app, uid) as http:
        response = await http.post("/api/messages", json=body)
        assert response.status_code == status
        assert (await http.get("/api/history")).json()["events"] == []


async def test_api_needs_the_cookie(app: Starlette) -> None:
    async with client(app) as http:
        assert (await http.get("/api/history")).status_code == 401
        assert (await http.post("/api/messages", json={"text": "hi", "client_id": "a"})).status_code == 401


def test_plan_answer_reads_the_request() -> None:
    logs, answer = demo.plan_answer("Euljiro, 2 people, tomorrow at 12:30")
    assert "party=2" in logs[0] and "tomorrow 12:30" in logs[0]
    assert "a table for 2" in answer and "(Euljiro), tomorrow at 12:30" in answer
    assert "".join(demo.split_tokens(answer)) == answer
    _, other = demo.plan_answer("Hongdae, 5 guests, 7.15")
    assert "a table for 5" in other and "today at 07:15" in other


def test_redis_url_selects_the_redis_store(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def from_url(url: str) -> MemoryStore:
        seen.append(url)
        return MemoryStore()

    monkeypatch.setattr(demo.RedisStore, "from_url", from_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/3")
    assert isinstance(demo.make_store(), MemoryStore)
    assert seen == ["redis://127.0.0.1:6390/3"]
    monkeypatch.delenv("REDIS_URL")
    assert isinstance(demo.make_store(), MemoryStore)
    assert seen == ["redis://127.0.0.1:6390/3"]
