"""Mounting the route in FastAPI and Starlette apps, the way api.md shows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_replay import MemoryStore, Publisher, Replay, allow_all

from .helpers import connect, running

pytestmark = pytest.mark.anyio


def http(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver")


def fastapi_app(replay: Replay) -> FastAPI:
    app = FastAPI(lifespan=replay.lifespan)
    app.add_api_websocket_route("/ws", replay.endpoint)

    @app.post("/async/{n}")
    async def publish_async(n: int, publisher: Publisher = Depends(replay.publisher)) -> dict[str, Any]:  # noqa: B008
        event = await publisher.publish("user:42", "task_interaction", {"n": n})
        return {"offset": event.offset}

    @app.post("/sync/{n}")
    def publish_sync(n: int) -> dict[str, Any]:
        # a `def` handler runs in a worker thread
        event = replay.publish_sync("user:42", "task_interaction", {"n": n})
        return {"offset": event.offset}

    app.router.routes.append(replay.route("/ws2"))
    return app


async def test_fastapi_route_and_publishers() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    async with running(fastapi_app(replay)) as app, http(app) as client:
        async with connect(app) as c, connect(app, "/ws2") as c2:
            await c.subscribe("user:42")
            await c2.subscribe("user:42")
            response = await client.post("/async/1")
            assert response.json() == {"offset": 1}
            response = await client.post("/sync/2")
            assert (response.status_code, response.json()) == (200, {"offset": 2})
            for sub in (c, c2):
                events = await sub.events(2)
                assert [(e["offset"], e["event"], e["data"]) for e in events] == [
                    (1, "task_interaction", {"n": 1}),
                    (2, "task_interaction", {"n": 2}),
                ]


async def test_plain_starlette_with_route_and_lifespan() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = Starlette(routes=[replay.route("/ws", name="replay"), replay.client_route()], lifespan=replay.lifespan)
    assert app.url_path_for("replay") == "/ws"
    async with running(app) as live:
        assert replay.running
        async with connect(live) as c:
            await c.subscribe("t")
            await replay.publish("t", "x", None)
            (event,) = await c.events(1)
            assert event["data"] is None
    assert not replay.running


async def test_app_with_its_own_lifespan_nesting_replay() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        seen.append("app start")
        async with replay:
            yield {"greeting": "hi"}
        seen.append("app stop")

    async def hello(request: Request) -> JSONResponse:
        event = await replay.publish("t", "x", request.state.greeting)
        return JSONResponse({"offset": event.offset})

    app = Starlette(routes=[replay.route("/ws"), Route("/hello", hello, methods=["POST"])], lifespan=lifespan)
    async with running(app) as live, http(live) as client, connect(live) as c:
        await c.subscribe("t")
        assert (await client.post("/hello")).json() == {"offset": 1}
        (event,) = await c.events(1)
        assert event["data"] == "hi"
    assert seen == ["app start", "app stop"]
    assert not replay.running


async def test_client_route_serves_javascript() -> None:
    replay = Replay(MemoryStore())
    app = Starlette(routes=[replay.client_route(), replay.client_route("/static/client.js", name="js")])
    async with http(app) as client:
        for path in ("/replay.js", "/static/client.js"):
            response = await client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/javascript")
            assert "replay.v1" in response.text
            head = await client.head(path)
            assert head.status_code == 200 and head.content == b""
        assert (await client.post("/replay.js")).status_code == 405
