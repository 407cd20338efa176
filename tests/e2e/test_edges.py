"""The route's edges over real sockets: handshake checks, frame limits, authorization, shutdown."""

from __future__ import annotations

import json
import signal
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.client import open_socket
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def recv(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(5):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; return its close code and reason (frames before it are skipped)."""
    with anyio.fail_after(10):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (None, "no close frame")


async def test_cross_origin_handshake_gets_403_same_origin_is_served(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers()
    url = server.ws_url()
    for origin in ("http://evil.example", f"http://localhost:{server.port + 1}", "null"):
        with pytest.raises(InvalidStatus) as refused:
            await open_socket(url, origin=origin)
        assert refused.value.response.status_code == 403, origin
    with pytest.raises(InvalidStatus) as refused:
        await open_socket(server.ws_url("/ws?identity=refuse"), origin=server.origin)
    assert refused.value.response.status_code == 403

    async with await open_socket(url, origin=server.origin) as ws:
        assert ws.subprotocol == "replay.v1"
        await send(ws, {"type": "subscribe", "topic": "room", "ref": 1})
        assert (await recv(ws))["type"] == "subscribed"
    # Non-browser clients send no Origin at all: allowed.
    async with await open_socket(url) as ws:
        await send(ws, {"type": "ping", "ref": "p"})
        assert await recv(ws) == {"type": "pong", "ref": "p"}
    assert "origin 'http://evil.example' not allowed" in server.log_text()


async def test_oversize_frame_closes_1009_and_the_limit_itself_is_served(uvicorn_servers: ServerFactory) -> None:
    limit = 2048
    server = uvicorn_servers(env={"REPLAY_MAX_MESSAGE_SIZE": limit})
    async with await open_socket(server.ws_url()) as ws:
        at_limit = json.dumps({"type": "ping", "ref": "edge"})
        at_limit += " " * (limit - len(at_limit))  # valid JSON, exactly `limit` bytes
        await ws.send(at_limit)
        assert await recv(ws) == {"type": "pong", "ref": "edge"}
        await ws.send(at_limit + " ")
        assert await closed_with(ws) == (1009, f"frame larger than {limit} bytes")
    # Multi-byte characters count as their UTF-8 bytes: 700 x 3 bytes is over 2048 though 700 characters are not.
    async with await open_socket(server.ws_url()) as ws:
        await send(ws, {"type": "ping", "ref": "x", "pad": "€" * 700})
        code, _ = await closed_with(ws)
        assert code == 1009


async def test_forbidden_topic_gets_an_error_and_the_connection_keeps_serving(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_FORBIDDEN_PREFIX": "admin:"})
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        async with await open_socket(server.ws_url()) as ws:
            await send(ws, {"type": "subscribe", "topic": "admin:secrets", "ref": "f1"})
            error = await recv(ws)
            assert {k: error.get(k) for k in ("type", "code", "topic", "ref")} == {
                "type": "error",
                "code": "forbidden",
                "topic": "admin:secrets",
                "ref": "f1",
            }
            await send(ws, {"type": "subscribe", "topic": "public", "ref": "ok"})
            subscribed = await recv(ws)
            assert (subscribed["type"], subscribed["topic"], subscribed["ref"]) == ("subscribed", "public", "ok")
            await http.post("/publish", json={"topic": "admin:secrets", "count": 2})
            await http.post("/publish", json={"topic": "public", "count": 2, "tag": "hello"})
            events = [await recv(ws), await recv(ws)]
            assert [(e["type"], e["topic"], e["offset"], e["data"]["tag"]) for e in events] == [
                ("event", "public", 1, "hello"),
                ("event", "public", 2, "hello"),
            ]
            await send(ws, {"type": "ping", "ref": "after"})
            assert await recv(ws) == {"type": "pong", "ref": "after"}  # nothing of admin:secrets came before it
            stats = (await http.get("/stats")).json()
            assert (stats["connections"], stats["subscriptions"]) == (1, 1)


async def test_sigterm_closes_clients_with_1012_or_1001_and_they_resume_in_a_new_epoch(
    uvicorn_servers: ServerFactory,
) -> None:
    server = uvicorn_servers()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        sockets = [await open_socket(server.ws_url()) for _ in range(3)]
        try:
            for ws in sockets:
                await send(ws, {"type": "subscribe", "topic": "news"})
                assert (await recv(ws))["type"] == "subscribed"
            old = (await http.post("/publish", json={"topic": "news", "count": 3})).json()
            for ws in sockets:
                assert [(await recv(ws))["offset"] for _ in range(3)] == [1, 2, 3]

            server.terminate()
            for ws in sockets:
                code, _ = await closed_with(ws)
                assert code in (1001, 1012)
            # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done.
            assert await server.await_exit(within=15) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in server.log_text()
        finally:
            for ws in sockets:
                ws.transport.abort()

        # The memory store's history died with the process: a resume says so (recovered false, new epoch).
        await server.astart()
        new = (await http.post("/publish", json={"topic": "news", "count": 2, "tag": "new"})).json()
        assert new["epoch"] != old["epoch"]
        async with await open_socket(server.ws_url()) as ws:
            await send(ws, {"type": "subscribe", "topic": "news", "epoch": old["epoch"], "offset": 3})
            subscribed = await recv(ws)
            assert {k: subscribed[k] for k in ("epoch", "offset", "resumed", "recovered", "replayed")} == {
                "epoch": new["epoch"],
                "offset": 2,
                "resumed": True,
                "recovered": False,
                "replayed": 2,
            }
            assert [(e["offset"], e["data"]["tag"]) for e in (await recv(ws), await recv(ws))] == [
                (1, "new"),
                (2, "new"),
            ]


async def test_idle_connection_gets_heartbeat_pings(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_HEARTBEAT": 0.2})
    async with await open_socket(server.ws_url()) as ws:
        assert await recv(ws) == {"type": "ping"}
        await send(ws, {"type": "ping", "ref": 7})
        assert await recv(ws) == {"type": "pong", "ref": 7}
        assert await recv(ws) == {"type": "ping"}


async def test_frame_flood_is_rate_limited_then_closed_1008(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_MAX_FRAME_RATE": 1, "REPLAY_FRAME_BURST": 5})
    async with await open_socket(server.ws_url()) as ws:
        for n in range(20):
            await send(ws, {"type": "ping", "ref": n})
        replies: list[dict[str, Any]] = []
        with anyio.fail_after(10):
            try:
                while True:
                    replies.append(json.loads(await ws.recv()))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None and exc.rcvd.code == 1008
    # The burst is served, the debt of one more burst is refused with rate_limited, then the close.
    assert replies[:5] == [{"type": "pong", "ref": n} for n in range(5)]
    assert {(r["type"], r.get("code")) for r in replies[5:]} == {("error", "rate_limited")}
    assert len(replies) <= 11


async def test_bad_frames_past_the_budget_close_1008(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_MAX_BAD_FRAMES": 3})
    async with await open_socket(server.ws_url()) as ws:
        await ws.send(b"\x00binary")
        error = await recv(ws)
        assert (error["type"], error["code"]) == ("error", "bad_request")
        await ws.send("not json")
        await send(ws, {"type": "subscribe", "topic": "bad topic!", "ref": "t"})
        codes = [(await recv(ws))["code"], (await recv(ws))["code"]]
        assert codes == ["bad_request", "bad_request"]
        await send(ws, {"type": "ping", "ref": "still-open"})
        assert await recv(ws) == {"type": "pong", "ref": "still-open"}
        await send(ws, {"type": "nonsense"})
        code, _ = await closed_with(ws)
        assert code == 1008


async def test_unsubscribe_stops_one_topic_and_not_the_other(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        async with await open_socket(server.ws_url()) as ws:
            for topic in ("a", "b"):
                await send(ws, {"type": "subscribe", "topic": topic})
                assert (await recv(ws))["type"] == "subscribed"
            await http.post("/publish", json={"topic": "a", "count": 1})
            assert (await recv(ws))["topic"] == "a"
            await send(ws, {"type": "unsubscribe", "topic": "a", "ref": "u"})
            assert await recv(ws) == {"type": "unsubscribed", "topic": "a", "ref": "u"}
            await http.post("/publish", json={"topic": "a", "count": 3})
            await http.post("/publish", json={"topic": "b", "count": 2})
            assert [((f := await recv(ws))["topic"], f["offset"]) for _ in range(2)] == [("b", 1), ("b", 2)]
            await send(ws, {"type": "unsubscribe", "topic": "a", "ref": "again"})
            error = await recv(ws)
            assert (error["code"], error["topic"], error["ref"]) == ("not_subscribed", "a", "again")
            stats = (await http.get("/stats")).json()
            assert (stats["subscriptions"], stats["topics"]) == (1, 1)
