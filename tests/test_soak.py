"""Load and churn, short versions: the long soak is ``bench/soak.py`` (see docs/reliability.md).

- ``test_short_soak``: ``bench/soak.py`` at CI size (300 connections on a real
  uvicorn process, 4 s of publishing): no error, no gap, no duplicate, every
  event delivered, the server's counts back to zero after the clients leave,
  and again after each of 3 cycles of all 300 connecting and leaving.
- ``test_churn_leaves_nothing_behind``: in-process, rounds of connections that
  connect, subscribe (some twice, some with a replay), read, unsubscribe or
  not, and leave, while a publisher runs; afterwards ``replay.stats()`` is all
  zeros, the store delivers no topic live, and the event loop holds exactly
  the tasks it held before the first connection.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

from starlette_replay import MemoryStore, Replay, allow_all

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0
ZERO = {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}


def load_soak() -> Any:
    path = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("bench_soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_short_soak(tmp_path: Path) -> None:
    soak = load_soak()
    with anyio.fail_after(120):
        figures = await soak.soak(
            300, 4.0, topics=30, rate=100.0, check_memory=False, churn=3, log_path=tmp_path / "server.log"
        )
    summary = {k: v for k, v in figures.__dict__.items() if k != "rss_samples"}
    print(f"\nsoak (short): {json.dumps(summary)}")
    assert figures.errors == []
    assert (figures.gaps, figures.duplicates, figures.unexpected_closes) == (0, 0, 0)
    assert figures.connections_held == 300
    assert figures.published >= 300 and figures.delivered >= figures.published * 300 // 30 - 300
    assert {k: figures.stats_after[k] for k in ZERO} == ZERO
    assert len(figures.churn_rss_mib) == 3  # each cycle's counts were checked (errors would say otherwise)
    assert figures.ok


@asynccontextmanager
async def socket(app: Starlette) -> AsyncIterator[AsyncWebSocketSession]:
    # One transport per client: httpx-ws shares one scope among a transport's connections.
    async with (
        httpx.AsyncClient(transport=ASGIWebSocketTransport(app), base_url="http://testserver") as client,
        aconnect_ws("/ws", client, subprotocols=["replay.v1"], keepalive_ping_interval_seconds=None) as ws,
    ):
        yield ws


async def receive(ws: AsyncWebSocketSession) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT):
        frame: dict[str, Any] = json.loads(await ws.receive_text())
    return frame


async def until(ws: AsyncWebSocketSession, kind: str) -> dict[str, Any]:
    while (frame := await receive(ws))["type"] != kind:
        assert frame["type"] in ("event", "subscribed", "unsubscribed"), frame
    return frame


async def test_churn_leaves_nothing_behind() -> None:
    store = MemoryStore(history_size=50)
    replay = Replay(store, authorize=allow_all, heartbeat_interval=3600)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    rng = random.Random(5)
    rounds, per_round, topics = 10, 30, [f"churn:{i}" for i in range(6)]
    async with LifespanManager(app):
        await anyio.wait_all_tasks_blocked()
        baseline = len(asyncio.all_tasks())
        published = 0

        async def one(plan: random.Random) -> None:
            nonlocal published
            async with socket(app) as ws:
                for _ in range(plan.randint(1, 3)):
                    topic = plan.choice(topics)
                    frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
                    if plan.random() < 0.3:
                        frame["rewind"] = plan.randint(1, 50)  # a replay, sometimes cut short by leaving
                    await ws.send_text(json.dumps(frame))
                    await until(ws, "subscribed")
                    await replay.publish(topic, "tick", {"n": published})
                    published += 1
                    if plan.random() < 0.5:
                        await until(ws, "event")
                if plan.random() < 0.3:
                    await ws.send_text(json.dumps({"type": "unsubscribe", "topic": topic}))
                    await until(ws, "unsubscribed")

        for _ in range(rounds):
            with anyio.fail_after(TIMEOUT * 3):
                async with anyio.create_task_group() as tg:
                    for _ in range(per_round):
                        tg.start_soon(one, random.Random(rng.random()))
        await anyio.wait_all_tasks_blocked()  # every server-side clean-up has run
        assert replay.stats() == ZERO
        assert store._live == set()  # the store delivers no topic live any more
        assert len(asyncio.all_tasks()) == baseline, [t.get_coro() for t in asyncio.all_tasks()]
    print(f"\nchurn: {rounds * per_round} connections, {published} events published; counts back to zero")
    assert published >= rounds * per_round
