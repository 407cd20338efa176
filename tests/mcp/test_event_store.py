"""ReplayEventStore with the real MCP SDK: server (uvicorn process) and client over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.servers import UvicornServer

pytestmark = pytest.mark.anyio

APP = "tests.mcp.app:make_app"


async def call_count(url: str, **arguments: Any) -> tuple[str, list[tuple[float, float | None, str | None]]]:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool("count", arguments, progress_callback=on_progress)
    assert not result.is_error, result
    (content,) = result.content
    return content.text, progress  # type: ignore[union-attr]


async def test_a_stream_closed_mid_call_resumes_from_last_event_id(uvicorn_servers: Any) -> None:
    server: UvicornServer = uvicorn_servers(app=APP)
    with anyio.fail_after(30):
        text, progress = await call_count(f"{server.http_url}/mcp", steps=20, delay=0.02, close_at=5)
    assert text == "counted 20"
    assert progress == [(float(i), 20.0, f"step {i}") for i in range(1, 21)], "every step once, in order"
    assert "resuming mcp:" in server.log_text(), "the resume was served by ReplayEventStore.wrap"


# --- raw HTTP: the client goes away mid-stream, and comes back with Last-Event-ID -----------------

PROTOCOL_VERSION = "2025-11-25"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def sse(response: httpx2.Response) -> AsyncIterator[tuple[str | None, dict[str, Any] | None]]:
    """(id, JSON data) of each SSE event of ``response`` (data None for an empty one: the SDK's priming)."""
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if event_id is not None or data:
                text = "\n".join(data)
                yield event_id, json.loads(text) if text else None
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class Session:
    """An MCP session over plain HTTP requests (no SDK client): to cut and resume streams at will."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.id = ""

    def headers(self, **extra: str) -> dict[str, str]:
        return {**ACCEPT, "mcp-session-id": self.id, "mcp-protocol-version": PROTOCOL_VERSION, **extra}

    async def open(self) -> None:
        body = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        async with self.http.stream("POST", self.url, json=body, headers=ACCEPT) as response:
            assert response.status_code == 200, await response.aread()
            self.id = response.headers["mcp-session-id"]
            async for _, data in sse(response):
                if data is not None:
                    assert "result" in data, data
                    break
        done = await self.http.post(
            self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self.headers()
        )
        assert done.status_code == 202, done.text

    def call(self, request_id: int, steps: int, delay: float) -> Any:
        return self.tool(request_id, "count", {"steps": steps, "delay": delay, "close_at": 0})

    def tool(self, request_id: int, name: str, arguments: dict[str, Any]) -> Any:
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": {"progressToken": f"p{request_id}"}},
        }
        return self.http.stream("POST", self.url, json=body, headers=self.headers())

    def listen(self) -> Any:
        """The session's standalone GET stream (server notifications outside any request)."""
        return self.http.stream("GET", self.url, headers=self.headers(accept="text/event-stream"))

    def resume(self, last_event_id: str, url: str | None = None, session: str | None = None) -> Any:
        headers = self.headers(**{"last-event-id": last_event_id})
        if session is not None:
            headers["mcp-session-id"] = session
        return self.http.stream("GET", url or self.url, headers=headers)


def steps_of(messages: list[dict[str, Any]]) -> list[float]:
    return [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]


async def read_until_response(response: httpx2.Response) -> tuple[list[dict[str, Any]], str | None]:
    """Every message of the stream until the request's response (included), and the last event id."""
    messages: list[dict[str, Any]] = []
    last: str | None = None
    async for event_id, data in sse(response):
        last = event_id or last
        if data is None:
            continue
        messages.append(data)
        if "result" in data or "error" in data:
            break
    return messages, last


async def test_a_client_that_went_away_mid_call_gets_the_rest_once(uvicorn_servers: Any) -> None:
    server: UvicornServer = uvicorn_servers(app=APP)
    url = f"{server.http_url}/mcp"
    with anyio.fail_after(30):
        async with httpx2.AsyncClient(timeout=10) as http:
            session = Session(http, url)
            await session.open()
            seen: list[dict[str, Any]] = []
            last = None
            async with session.call(1, steps=15, delay=0.05) as response:
                async for event_id, data in sse(response):
                    last = event_id or last
                    if data is not None:
                        seen.append(data)
                    if len(steps_of(seen)) == 3:
                        break  # leave: the connection is closed under the running call
            assert last is not None and steps_of(seen) == [1, 2, 3]
            async with session.resume(last) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                rest, _ = await read_until_response(response)
    assert steps_of(seen + rest) == list(range(1, 16)), "every step once, in order"
    assert rest[-1]["id"] == 1 and rest[-1]["result"]["content"][0]["text"] == "counted 15"


async def test_sessions_with_the_same_request_ids_are_kept_apart(uvicorn_servers: Any) -> None:
    """Both sessions' calls have id 1: each stream is its session's own, and one session cannot resume the
    other's stream with its event id."""
    server: UvicornServer = uvicorn_servers(app=APP)
    url = f"{server.http_url}/mcp"
    with anyio.fail_after(30):
        async with httpx2.AsyncClient(timeout=10) as http:
            a, b = Session(http, url), Session(http, url)
            await a.open()
            await b.open()
            results: dict[str, tuple[list[dict[str, Any]], str | None]] = {}

            async def run(name: str, session: Session, steps: int) -> None:
                async with session.call(1, steps=steps, delay=0.01) as response:
                    results[name] = await read_until_response(response)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "a", a, 4)
                tg.start_soon(run, "b", b, 6)
            assert steps_of(results["a"][0]) == [1, 2, 3, 4]
            assert steps_of(results["b"][0]) == [1, 2, 3, 4, 5, 6]
            last_of_a = results["a"][1]
            assert last_of_a is not None and a.id in last_of_a
            async with a.resume(last_of_a, session=b.id) as response:
                assert response.status_code == 404
            async with a.resume(last_of_a, session=a.id) as response:
                assert response.status_code == 200  # its own: the stream is complete, nothing more comes
                assert [data async for _, data in sse(response)] == []


async def test_the_standalone_stream_resumes_after_the_client_went_away(uvicorn_servers: Any) -> None:
    """Session notifications travel on the GET stream, which has no response to end it: a resume sends
    what was missed, then follows the stream for as long as the client stays."""
    server: UvicornServer = uvicorn_servers(app=APP)
    url = f"{server.http_url}/mcp"

    def uris(messages: list[dict[str, Any]]) -> list[str]:
        return [m["params"]["uri"] for m in messages if m.get("method") == "notifications/resources/updated"]

    with anyio.fail_after(30):
        async with httpx2.AsyncClient(timeout=10) as http:
            session = Session(http, url)
            await session.open()
            seen: list[dict[str, Any]] = []
            last = None
            async with session.listen() as stream:
                assert stream.status_code == 200
                async with session.tool(1, "announce", {"count": 10, "delay": 0.02}) as call:
                    async for event_id, data in sse(stream):
                        last = event_id or last
                        if data is not None:
                            seen.append(data)
                        if len(uris(seen)) == 3:
                            break  # the GET goes away; the tool goes on announcing
                    done, _ = await read_until_response(call)
            assert done[-1]["result"]["content"][0]["text"] == "announced 10"
            assert last is not None and uris(seen) == ["mem://0", "mem://1", "mem://2"]
            rest: list[dict[str, Any]] = []
            async with session.resume(last) as stream:
                assert stream.status_code == 200
                async for _, data in sse(stream):
                    if data is not None:
                        rest.append(data)
                    if len(uris(rest)) == 7:
                        break
    assert uris(seen + rest) == [f"mem://{i}" for i in range(10)], "every notification once, in order"
