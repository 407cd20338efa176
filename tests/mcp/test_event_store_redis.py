"""ReplayEventStore on RedisStore: a resume served by a second server process that never ran the call."""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.redis_server import RedisServer
from tests.servers import UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

APP = "tests.mcp.app:make_app"


class ResumeElsewhere(httpx2.AsyncBaseTransport):
    """A load balancer in miniature: resumes (a GET with Last-Event-ID) go to another server process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.inner = httpx2.AsyncHTTPTransport()
        self.resumes = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.method == "GET" and "last-event-id" in request.headers:
            self.resumes += 1
            request.url = request.url.copy_with(port=self.port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_second_process_serves_the_resume_from_redis(uvicorn_servers: Any, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url, "REDIS_PREFIX": f"mcp-{secrets.token_hex(4)}"}
    a: UvicornServer = uvicorn_servers(app=APP, env=env, name="a")
    b: UvicornServer = uvicorn_servers(app=APP, env=env, name="b")
    transport = ResumeElsewhere(b.port or 0)
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(30, read=60)) as http,
            streamable_http_client(f"{a.http_url}/mcp", http_client=http, terminate_on_close=False) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            # A closes the call's stream at step 5 and keeps counting; the client's reconnect goes to B,
            # which has no session and never ran the call: it serves the stream from Redis to the end.
            result = await session.call_tool(
                "count", {"steps": 30, "delay": 0.02, "close_at": 5}, progress_callback=on_progress
            )
    assert not result.is_error, result
    assert result.content[0].text == "counted 30"  # type: ignore[union-attr]
    assert progress == [(float(i), 30.0, f"step {i}") for i in range(1, 31)], "every step once, in order"
    assert transport.resumes == 1
    assert "resuming mcp:" in b.log_text() and "resuming" not in a.log_text()
    assert "Created new transport" in a.log_text() and "Created new transport" not in b.log_text()
