"""Security: cross-site WebSocket hijacking, tokens kept out of logs, revocation, limits.

In-process (httpx-ws ASGI transport, one per client) against the runnable
example ``example_app/auth_example.py``; one test runs it in a real uvicorn
process to check uvicorn's own log lines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from example_app.auth_example import DropQueryString, create_app
from starlette_replay import Refused, Replay, allow_all
from tests.servers import UvicornServer, pytest_runtest_makereport, uvicorn_servers  # noqa: F401

pytestmark = pytest.mark.anyio

BASE = "http://testserver"
TIMEOUT = 5.0
TOKEN = "tok_SECRET_5f0c9e1d"  # a distinctive string to look for in the logs
TOKENS = {TOKEN: "42", "tok_other": "7"}


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[Starlette]:
    # The app itself, not manager.app: asgi-lifespan hands every request the same
    # scope["state"] dict (uvicorn copies it per request), so websocket.state
    # would be shared between connections.
    async with LifespanManager(app):
        yield app


def client(app: Any, cookies: dict[str, str] | None = None) -> httpx.AsyncClient:
    # One transport per client: httpx-ws shares one scope among a transport's connections.
    return httpx.AsyncClient(transport=ASGIWebSocketTransport(app), base_url=BASE, cookies=cookies)


@asynccontextmanager
async def socket(
    app: Any,
    path: str = "/ws",
    *,
    cookies: dict[str, str] | None = None,
    origin: str | None = None,
    subprotocols: list[str] | None = None,
) -> AsyncIterator[AsyncWebSocketSession]:
    headers = {"origin": origin} if origin else {}
    async with (
        client(app, cookies) as http,
        aconnect_ws(
            path,
            http,
            headers=headers,
            subprotocols=subprotocols or ["replay.v1"],
            keepalive_ping_interval_seconds=None,
        ) as ws,
    ):
        yield ws


def leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)  # an exception group (Python 3.10 has no builtin name)
    if inner is None:
        return [exc]
    return [leaf for one in inner for leaf in leaves(one)]


async def refused(app: Any, path: str = "/ws", **kwargs: Any) -> None:
    """Assert the handshake is closed before accept (a real server answers HTTP 403)."""
    try:
        with anyio.fail_after(TIMEOUT):
            async with socket(app, path, **kwargs):
                pass
    except Exception as exc:
        errors = leaves(exc)
        assert len(errors) == 1 and isinstance(errors[0], WebSocketDisconnect), errors
        assert errors[0].code == 1008, errors  # a close before accept: HTTP 403 under uvicorn
    else:
        pytest.fail("the handshake was accepted")


async def receive(ws: AsyncWebSocketSession) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT):
        frame: dict[str, Any] = json.loads(await ws.receive_text())
    return frame


async def ping(ws: AsyncWebSocketSession, ref: Any = "p") -> None:
    await ws.send_text(json.dumps({"type": "ping", "ref": ref}))
    assert await receive(ws) == {"type": "pong", "ref": ref}


async def closed_with(ws: AsyncWebSocketSession) -> int:
    """Read until the server closes; the close code."""
    with anyio.fail_after(TIMEOUT), pytest.raises(WebSocketDisconnect) as closed:
        while True:
            await ws.receive_text()
    return closed.value.code


async def login(app: Any, user: str) -> dict[str, str]:
    async with client(app) as http:
        response = await http.post("/login", json={"user": user})
    assert response.status_code == 200
    return {"session": response.cookies["session"]}


# --- cross-site WebSocket hijacking ------------------------------------------------------


async def test_cookie_session_from_a_foreign_origin_is_refused() -> None:
    async with running(create_app(TOKENS)) as app:
        cookies = await login(app, "42")
        for origin in ("https://evil.example", "http://testserver.evil.example", "null", "http://testserver:8080"):
            await refused(app, cookies=cookies, origin=origin)
        await refused(app, origin=BASE)  # same origin, no session: not signed in
        async with socket(app, cookies=cookies, origin=BASE) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "user:42", "ref": 1}))
            assert (await receive(ws))["type"] == "subscribed"
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "user:7", "ref": 2}))
            assert (await receive(ws))["code"] == "forbidden"


async def test_bearer_token_in_a_subprotocol_is_accepted_and_never_echoed() -> None:
    async with running(create_app(TOKENS)) as app:
        async with socket(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"]) as ws:
            assert ws.subprotocol == "replay.v1"
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "user:42"}))
            assert (await receive(ws))["type"] == "subscribed"
        await refused(app, subprotocols=["replay.v1", "bearer.tok_unknown"])


async def test_cross_site_handshake_gets_http_403_from_uvicorn(uvicorn_servers: Any) -> None:  # noqa: F811
    server: UvicornServer = uvicorn_servers(app="tests.test_security_auth:uvicorn_app")
    extra = {"subprotocols": [Subprotocol("replay.v1"), Subprotocol(f"bearer.{TOKEN}")]}
    with anyio.fail_after(TIMEOUT), pytest.raises(InvalidStatus) as refusal:
        async with ws_connect(server.ws_url(), origin=Origin("https://evil.example"), **extra):
            pass
    assert refusal.value.response.status_code == 403
    with anyio.fail_after(TIMEOUT):
        async with ws_connect(server.ws_url(), origin=Origin(server.origin), **extra) as ws:
            assert ws.subprotocol == "replay.v1"


# --- tokens never logged -----------------------------------------------------------------


def query_token_app() -> Starlette:
    """An app whose clients pass a token in the query string (discouraged, but seen)."""

    def identify(websocket: WebSocket) -> str:
        user = TOKENS.get(websocket.query_params.get("token", ""))
        if user is None:
            raise Refused("unknown token")
        return user

    replay = Replay(
        identify=identify,
        authorize=lambda websocket, topic: topic != "forbidden",
        max_bad_frames=3,
        max_frame_rate=1.0,
        frame_burst=20,
        max_connections_per_identity=2,
    )
    return Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)


async def test_tokens_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Every path a session can take, at DEBUG: no log record holds the token."""
    caplog.set_level(logging.DEBUG)
    async with running(query_token_app()) as app:
        path = f"/ws?token={TOKEN}"
        async with socket(app, path) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "t", "ref": TOKEN}))
            subscribed = await receive(ws)
            assert subscribed["type"] == "subscribed"
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "forbidden"}))
            assert (await receive(ws))["code"] == "forbidden"
            ack = {"type": "ack", "topic": "t", "epoch": subscribed["epoch"], "offset": 0}
            await ws.send_text(json.dumps(ack))  # stored under the identity: no reply
            await ping(ws)
        async with socket(app, path) as first, socket(app, path):
            await refused(app, path)  # max_connections_per_identity
            for _ in range(4):
                await first.send_text("not json " + TOKEN)
            assert await closed_with(first) == 1008
        await refused(app, "/ws?token=tok_wrong" + TOKEN)
        await refused(app, path, origin="https://evil.example")
    example = create_app(TOKENS)
    async with running(example) as app:
        async with socket(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"]) as ws:
            await ws.send_text(json.dumps({"type": "subscribe", "topic": "user:42"}))
            assert (await receive(ws))["type"] == "subscribed"
            async with client(app) as http:
                await http.post("/login", json={"user": "42"})
            assert await example.state.replay.revoke("42") == 1
            assert await closed_with(ws) == 1008
        await refused(app, subprotocols=["replay.v1", f"bearer.{TOKEN}x"])
        await refused(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"], origin="https://evil.example")
    library = [r for r in caplog.records if r.name.startswith("starlette_replay")]
    assert len(library) >= 8, [r.getMessage() for r in library]  # the sessions were logged at all
    for record in library:
        text = record.getMessage() + (record.exc_text or "") + repr(record.__dict__.get("args"))
        assert TOKEN not in text, f"{record.name}: {text}"


def test_uvicorn_log_filter_drops_the_query_string() -> None:
    accepted = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", f"/ws?token={TOKEN}"),
        None,
    )
    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/feed?token={TOKEN}", "1.1", 200),
        None,
    )
    for record in (accepted, access):
        assert TOKEN in record.getMessage()  # what uvicorn would write without the filter
        assert DropQueryString().filter(record)
        assert TOKEN not in record.getMessage()
    assert accepted.getMessage() == '127.0.0.1:5000 - "WebSocket /ws" [accepted]'
    assert access.getMessage() == '127.0.0.1:5000 - "GET /feed HTTP/1.1" 200'


def uvicorn_app() -> Starlette:
    """``tests.test_security_auth:uvicorn_app`` for uvicorn ``--factory``: the auth example,
    a ``/health`` route for the harness, DEBUG library logs and the query-string filter."""
    logging.getLogger("uvicorn.error").addFilter(DropQueryString())
    logging.getLogger("starlette_replay").setLevel(logging.DEBUG)
    logging.basicConfig(level=logging.INFO)
    app = create_app(TOKENS)

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"ok": True})

    app.router.routes.append(Route("/health", health))
    return app


async def test_query_token_stays_out_of_the_uvicorn_log(uvicorn_servers: Any) -> None:  # noqa: F811
    server: UvicornServer = uvicorn_servers(app="tests.test_security_auth:uvicorn_app")
    subprotocols = [Subprotocol("replay.v1"), Subprotocol(f"bearer.{TOKEN}")]
    with anyio.fail_after(TIMEOUT):
        async with ws_connect(server.ws_url(f"/ws?token={TOKEN}"), subprotocols=subprotocols) as ws:
            await ws.send(json.dumps({"type": "subscribe", "topic": "user:42"}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
    server.stop()
    log = server.log_text()
    assert '"WebSocket /ws" [accepted]' in log, log  # the line is there, without its query
    assert "connected (identity='42')" in log, log  # the library logged at DEBUG
    assert TOKEN not in log


# --- revocation --------------------------------------------------------------------------


async def test_revoke_closes_every_connection_of_the_identity_with_1008() -> None:
    example = create_app(TOKENS)
    replay: Replay = example.state.replay
    async with running(example) as app:
        cookies = await login(app, "42")
        async with (
            socket(app, cookies=cookies) as a,
            socket(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"]) as b,
            socket(app, subprotocols=["replay.v1", "bearer.tok_other"]) as other,
        ):
            for ws, topic in ((a, "user:42"), (b, "user:42"), (other, "user:7")):
                await ws.send_text(json.dumps({"type": "subscribe", "topic": topic}))
                frame = await receive(ws)
                assert frame["type"] == "subscribed", frame
            assert replay.stats()["connections"] == 3
            assert await replay.revoke("nobody") == 0
            async with client(app, cookies) as http:
                response = await http.post("/logout")  # the app's logout calls revoke("42")
            assert response.json() == {"closed": 2}
            assert await closed_with(a) == 1008
            assert await closed_with(b) == 1008
            assert replay.stats() == {
                "connections": 1,
                "sse_streams": 0,
                "subscriptions": 1,
                "topics": 1,
                "queued_frames": 0,
            }
            await ping(other)  # another identity is untouched
            await refused(app, cookies=cookies)  # the session is gone: a reconnect is refused


async def test_revoke_reaches_a_handshake_in_progress() -> None:
    """A connection whose accept() is still pending when revoke() runs is closed with 1008 once accepted."""
    entered, proceed = anyio.Event(), anyio.Event()
    replay = Replay(identify=lambda websocket: "42", authorize=allow_all)

    async def endpoint(websocket: WebSocket) -> None:
        original_accept = websocket.accept

        async def slow_accept(*args: Any, **kwargs: Any) -> None:
            entered.set()
            await proceed.wait()
            await original_accept(*args, **kwargs)

        websocket.accept = slow_accept  # type: ignore[method-assign]
        await replay.endpoint(websocket)

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)], lifespan=replay.lifespan)
    codes: list[int] = []
    revoked: list[int] = []

    async def connect_and_wait_for_close() -> None:
        async with socket(asgi) as ws:
            codes.append(await closed_with(ws))

    async def revoke() -> None:
        revoked.append(await replay.revoke("42"))

    async with running(app) as asgi, anyio.create_task_group() as tg:
        tg.start_soon(connect_and_wait_for_close)
        with anyio.fail_after(TIMEOUT):
            await entered.wait()
            tg.start_soon(revoke)
            await anyio.wait_all_tasks_blocked()  # revoke() has aborted the connection and waits for its close
            assert not revoked
            proceed.set()
    assert (codes, revoked) == ([1008], [1])
    assert replay.stats()["connections"] == 0


# --- limits -------------------------------------------------------------------------------


async def test_max_connections_per_identity_refuses_the_next_handshake() -> None:
    example = create_app(TOKENS, max_connections_per_identity=2)
    replay: Replay = example.state.replay
    async with running(example) as app:
        mine = ["replay.v1", f"bearer.{TOKEN}"]
        async with socket(app, subprotocols=mine) as first, socket(app, subprotocols=mine):
            await refused(app, subprotocols=mine)
            async with socket(app, subprotocols=["replay.v1", "bearer.tok_other"]) as other:
                await ping(other)  # the limit is per identity
            await ping(first)
            assert replay.stats()["connections"] == 2
        async with socket(app, subprotocols=mine) as again:  # freed when they closed
            await ping(again)


async def test_concurrent_handshakes_never_exceed_the_identity_limit() -> None:
    example = create_app(TOKENS, max_connections_per_identity=3)
    replay: Replay = example.state.replay
    async with running(example) as app:
        accepted = 0
        done = anyio.Event()
        held = anyio.Event()
        outcomes: list[bool] = []

        async def one() -> None:
            nonlocal accepted
            try:
                async with socket(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"]) as ws:
                    accepted += 1
                    outcomes.append(True)
                    if len(outcomes) == 10:
                        held.set()
                    await ping(ws)
                    with anyio.fail_after(TIMEOUT):
                        await done.wait()
            except Exception as exc:
                assert [type(e) for e in leaves(exc)] == [WebSocketDisconnect], exc
                outcomes.append(False)
                if len(outcomes) == 10:
                    held.set()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
            with anyio.fail_after(TIMEOUT):
                await held.wait()
            assert replay.stats()["connections"] == 3
            done.set()
        assert outcomes.count(True) == 3 and accepted == 3


def test_limits_must_be_positive() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_connections_per_identity"):
            Replay(max_connections_per_identity=bad)  # type: ignore[arg-type]


async def test_frame_rate_limit_drops_then_closes_with_1008_per_connection() -> None:
    """Token bucket: ``frame_burst`` frames pass, then ``rate_limited`` errors, then 1008."""
    replay = Replay(authorize=allow_all, max_frame_rate=0.001, frame_burst=5)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    async with running(app) as asgi, socket(asgi) as flooder, socket(asgi) as calm:
        for i in range(5):
            await ping(flooder, i)
        for i in range(5):
            await flooder.send_text(json.dumps({"type": "ping", "ref": i}))
            frame = await receive(flooder)
            assert (frame["type"], frame["code"]) == ("error", "rate_limited"), frame
            assert frame["ref"] == i  # the client learns which frame to send again
        await flooder.send_text(json.dumps({"type": "ping"}))
        assert await closed_with(flooder) == 1008
        await ping(calm)  # the limit is per connection


async def test_bad_frame_budget_closes_with_1008() -> None:
    replay = Replay(authorize=allow_all, max_bad_frames=3)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    async with running(app) as asgi, socket(asgi) as ws:
        for _ in range(3):
            await ws.send_bytes(b"\x00binary")
            assert (await receive(ws))["code"] == "bad_request"
        await ping(ws)  # good frames do not count
        await ws.send_text("{")
        assert await closed_with(ws) == 1008


async def test_the_python_client_never_logs_its_token(caplog: pytest.LogCaptureFixture) -> None:
    """The library's client, given a token in the URL's query string and in a subprotocol."""
    from starlette_replay.client import Backoff, ClientStopped, HandshakeRejected, ReplayClient
    from tests.client.helpers import serve, take, url

    caplog.set_level(logging.DEBUG, logger="starlette_replay")
    example = create_app(TOKENS)
    replay: Replay = example.state.replay
    async with serve(example) as port:
        await replay.publish("user:42", "note", {"n": 1})
        client = ReplayClient(
            f"{url(port)}?token={TOKEN}",
            ["user:42"],
            subprotocols=[f"bearer.{TOKEN}"],
            rewind=1,
            backoff=Backoff(initial=0.01, max=0.05),
        )
        async with client:
            assert TOKEN not in repr(client)
            with anyio.fail_after(TIMEOUT):
                assert len(await take(client, 1)) == 1
                assert await replay.revoke("42") == 1
                with pytest.raises(ClientStopped):  # the client stops on 1008
                    async for _ in client:
                        pass
        refused_client = ReplayClient(f"{url(port)}?token={TOKEN}", ["user:42"], subprotocols=[f"bearer.{TOKEN}x"])
        async with refused_client:
            with anyio.fail_after(TIMEOUT), pytest.raises(HandshakeRejected):
                async for _ in refused_client:
                    pass
    library = [r for r in caplog.records if r.name.startswith("starlette_replay")]
    assert any("connected to" in r.getMessage() for r in library), [r.getMessage() for r in library]
    for record in library:
        text = record.getMessage() + (record.exc_text or "")
        assert TOKEN not in text, f"{record.name}: {text}"


async def test_recheck_closes_the_connections_that_fail_with_1008(caplog: pytest.LogCaptureFixture) -> None:
    example = create_app(TOKENS)
    replay: Replay = example.state.replay
    expired = {TOKEN}  # the app's view: this token expired since the handshake

    def still_valid(websocket: WebSocket, identity: str | None) -> bool:
        offered = [p.strip() for p in websocket.scope.get("subprotocols", [])]
        return not any(p.removeprefix("bearer.") in expired for p in offered if p.startswith("bearer."))

    async with running(example) as app:
        async with (
            socket(app, subprotocols=["replay.v1", f"bearer.{TOKEN}"]) as stale,
            socket(app, subprotocols=["replay.v1", "bearer.tok_other"]) as fresh,
        ):
            assert await replay.recheck(still_valid) == 1
            assert await closed_with(stale) == 1008
            await ping(fresh)

            async def broken(websocket: WebSocket, identity: str | None) -> bool:
                raise RuntimeError("the token service is down")

            assert await replay.recheck(broken) == 1  # a check that raises counts as failed
            assert await closed_with(fresh) == 1008
        assert replay.stats()["connections"] == 0
    assert any("recheck() raised" in r.getMessage() for r in caplog.records)
