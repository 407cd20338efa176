"""An MCP server (the SDK's ``MCPServer``) whose streams resume through ``ReplayEventStore``.

``python -m uvicorn --factory tests.mcp.app:make_app``; with ``REDIS_URL`` the
Replay's store is a ``RedisStore`` (several processes then share the streams),
else a ``MemoryStore``. ``GET /health`` answers once the Replay runs.

The tool ``count(steps, delay, close_at)`` reports progress ``1..steps``, one
step every ``delay`` seconds, and answers ``"counted <steps>"``; at step
``close_at`` it closes the request's SSE stream (the SDK's server-side
disconnect: the client reconnects with ``Last-Event-ID``), and goes on.
The tool ``announce(count, delay)`` sends ``count`` session notifications
(``resources/updated`` for ``mem://0`` ...), which travel on the session's
standalone GET stream, one every ``delay`` seconds.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from starlette_replay import EventStore, MemoryStore, RedisStore, Replay
from starlette_replay.mcp import ReplayEventStore

__all__ = ["make_app"]


def make_app() -> ASGIApp:
    url = os.environ.get("REDIS_URL")
    store: EventStore = (
        RedisStore.from_url(url, prefix=os.environ.get("REDIS_PREFIX", "replay")) if url else MemoryStore()
    )
    replay = Replay(store)
    event_store = ReplayEventStore(replay, poll_interval=0.02, max_poll_interval=0.2)
    server = MCPServer("counter")

    @server.tool()
    async def count(steps: int, delay: float, close_at: int, ctx: Context) -> str:
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, message=f"step {step}")
            if step == close_at:
                await ctx.close_sse_stream()
            await anyio.sleep(delay)
        return f"counted {steps}"

    @server.tool()
    async def announce(count: int, delay: float, ctx: Context) -> str:
        for i in range(count):
            await ctx.session.send_resource_updated(f"mem://{i}")
            await anyio.sleep(delay)
        return f"announced {count}"

    mcp_app = server.streamable_http_app(event_store=event_store, retry_interval=50)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with replay, mcp_app.router.lifespan_context(mcp_app):
            yield

    app = Starlette(routes=[Route("/health", health), Mount("/", app=mcp_app)], lifespan=lifespan)
    return event_store.wrap(app)
