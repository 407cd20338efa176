"""docs/ai-streams.md's Python examples, run for real so that the guide cannot rot.

Each example sits right after a ``<!-- doc-test: NAME -->`` comment; a test
executes it as a module, runs the app's lifespan and checks what the guide says.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

pytestmark = pytest.mark.anyio

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "ai-streams.md"
_MARKED_BLOCK = re.compile(r"<!-- doc-test: ([a-z0-9-]+) -->\n```python\n(.*?)\n```", re.DOTALL)


def load(name: str) -> types.ModuleType:
    blocks = dict(_MARKED_BLOCK.findall(GUIDE.read_text(encoding="utf-8")))
    assert set(blocks) == {"conversation", "mcp"}, "a marked block without a test (or a test without its block)"
    module = types.ModuleType(f"ai_streams_{name}")
    module.__file__ = str(GUIDE)
    exec(compile(blocks[name], f"docs/ai-streams.md[{name}]", "exec"), module.__dict__)
    return module


async def frames_until(ws: Any, done: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while not frames or not done(frames[-1]):
            frames.append(json.loads(await ws.receive_text()))
    return frames


def is_end(frame: dict[str, Any]) -> bool:
    return frame.get("event") == "answer_end"


async def test_an_answer_streams_between_markers_and_folds_into_its_end() -> None:
    doc = load("conversation")
    async with (
        LifespanManager(doc.app) as manager,
        httpx.AsyncClient(transport=ASGIWebSocketTransport(manager.app), base_url="http://t") as http,
        aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws,
    ):
        await ws.send_text(json.dumps({"type": "subscribe", "topic": "conv:1"}))
        await frames_until(ws, lambda f: f["type"] == "subscribed")
        posted = await http.post("/conversations/1/messages", json={"text": "tides"})
        assert posted.status_code == 202
        frames = await frames_until(ws, is_end)
        snapshot = (await http.get("/conversations/1/snapshot")).json()
    expected = "You asked: tides. Here is a long and careful answer to it. "
    assert [f["event"] for f in frames[:2]] == ["user_message", "answer_start"]
    deltas = [f["data"] for f in frames if f["event"] == "answer_delta"]
    assert "".join(d["text"] for d in deltas) == expected
    assert deltas[0]["seq"] == 0
    assert (frames[-1]["data"]["state"], frames[-1]["data"]["text"]) == ("done", expected)
    assert [f["offset"] for f in frames] == list(range(1, len(frames) + 1))
    # the late joiner's snapshot: the finished answer is its end marker alone, the cursor the head
    assert [e["event"] for e in snapshot["events"]] == ["user_message", "answer_end"]
    assert snapshot["events"][1]["data"]["text"] == expected
    assert snapshot["cursor"]["offset"] == frames[-1]["offset"]


async def test_stop_is_a_message_the_agent_reads() -> None:
    doc = load("conversation")
    stored = anyio.Event()

    async def model_tokens(prompt: str) -> AsyncIterator[str]:
        # three tokens, then the model "thinks" until the stop is stored, then would go on for long
        for word in ("one ", "two ", "three "):
            yield word
        await stored.wait()
        for _ in range(1000):
            yield "more "

    doc.model_tokens = model_tokens
    async with (
        LifespanManager(doc.app) as manager,
        httpx.AsyncClient(transport=ASGIWebSocketTransport(manager.app), base_url="http://t") as http,
    ):
        async with aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "conv:2"}))
            await frames_until(ws, lambda f: f["type"] == "subscribed")
            answer_id = (await http.post("/conversations/2/messages", json={"text": "tides"})).json()["answer_id"]
            await frames_until(ws, lambda f: f.get("event") == "answer_delta")
        # the socket is closed: the answer goes on; a stop ends it
        assert (await http.post(f"/conversations/2/answers/{answer_id}/stop")).status_code == 202
        stored.set()
        async with aconnect_ws("/ws", http, subprotocols=["replay.v1"]) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "conv:2", "rewind": 1000}))
            frames = await frames_until(ws, is_end)
    end = frames[-1]["data"]
    deltas = "".join(f["data"]["text"] for f in frames if f.get("event") == "answer_delta")
    assert end["state"] == "stopped"
    assert end["text"] == deltas and 0 < len(deltas) < len(
        "You asked: tides. Here is a long and careful answer to it. "
    )


def test_the_mcp_example_builds_its_app() -> None:
    doc = load("mcp")
    assert callable(doc.app)
    assert doc.event_store.replay is doc.replay
