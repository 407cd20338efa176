"""The handshake: origin check, identify, subprotocol negotiation.

These drive the ASGI app directly so that they see what the server sends in
answer to ``websocket.connect``: an ``accept``, a ``close`` before accept (which
an ASGI server turns into HTTP 403), or a denial response with a status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
from starlette.websockets import WebSocket

from starlette_replay import MemoryStore, Refused, Replay, allow_all

from .helpers import TIMEOUT, connect, make_app, refused_handshake, running

pytestmark = pytest.mark.anyio


async def handshake(
    app: Any,
    *,
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] = (),
    denial_extension: bool = True,
    host: str = "testserver",
    query: bytes = b"",
) -> dict[str, Any]:
    """The first message the app sends in answer to ``websocket.connect``.

    The client disconnects right after, so the app runs to completion.
    """
    raw_headers = [(b"host", host.encode())] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "http_version": "1.1",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": query,
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": list(subprotocols),
        "extensions": {"websocket.http.response": {}} if denial_extension else {},
        "state": {},
    }
    sent: list[dict[str, Any]] = []
    incoming = iter([{"type": "websocket.connect"}])

    async def receive() -> dict[str, Any]:
        return next(incoming, {"type": "websocket.disconnect", "code": 1000})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(TIMEOUT):
        await app(scope, receive, send)
    return sent[0]


@pytest.fixture
async def replay_app(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Replay, Any]]:
    options: dict[str, Any] = {"authorize": allow_all}
    marker = request.node.get_closest_marker("replay")
    if marker is not None:
        options.update(marker.kwargs)
    replay = Replay(MemoryStore(), **options)
    async with running(make_app(replay)) as app:
        yield replay, app


# --- subprotocol ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ([], None),
        (["replay.v1"], "replay.v1"),
        (["token.abc123", "replay.v1"], "replay.v1"),
        (["replay.v1", "token.abc123"], "replay.v1"),
        (["token.abc123"], None),
        (["replay.v2"], None),
    ],
)
async def test_subprotocol_echoed_only_when_offered(
    replay_app: tuple[Replay, Any], offered: list[str], chosen: str | None
) -> None:
    _, app = replay_app
    message = await handshake(app, subprotocols=offered)
    assert message["type"] == "websocket.accept"
    assert message.get("subprotocol") == chosen


async def test_subprotocol_over_the_in_process_socket(replay_app: tuple[Replay, Any]) -> None:
    _, app = replay_app
    async with connect(app, subprotocols=["token.secret", "replay.v1"]) as c:
        assert c.subprotocol == "replay.v1"
        await c.nothing_pending()
    async with connect(app, subprotocols=["token.secret"]) as c:
        assert c.subprotocol is None
        await c.nothing_pending()


# --- origin --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "accepted"),
    [
        (None, "testserver", True),  # not a browser
        ("http://testserver", "testserver", True),
        ("https://testserver", "testserver", True),  # behind a TLS-terminating proxy
        ("http://TestServer", "testserver", True),
        ("http://testserver:8000", "testserver:8000", True),
        ("http://testserver:8001", "testserver:8000", False),
        ("http://testserver:8000", "testserver", False),
        ("http://evil.example", "testserver", False),
        ("http://testserver.evil.example", "testserver", False),
        ("null", "testserver", False),
        ("file://testserver", "testserver", False),
        ("not a url", "testserver", False),
        ("http://testserver:99999", "testserver", False),
    ],
)
async def test_default_origin_check(
    replay_app: tuple[Replay, Any], origin: str | None, host: str, accepted: bool
) -> None:
    _, app = replay_app
    headers = {} if origin is None else {"origin": origin}
    message = await handshake(app, headers=headers, host=host)
    if accepted:
        assert message["type"] == "websocket.accept"
    else:
        # close before accept: the ASGI server answers HTTP 403
        assert message["type"] == "websocket.close", message


@pytest.mark.replay(allowed_origins=["https://app.example", "http://localhost:3000/"])
async def test_allowed_origins_list(replay_app: tuple[Replay, Any]) -> None:
    _, app = replay_app
    for origin, ok in [
        ("https://app.example", True),
        ("http://localhost:3000", True),
        ("https://app.example/", True),
        ("http://testserver", False),  # same origin is not implied by a list
        ("https://evil.example", False),
    ]:
        message = await handshake(app, headers={"origin": origin})
        assert (message["type"] == "websocket.accept") is ok, origin


@pytest.mark.replay(allowed_origins=["*"])
async def test_allowed_origins_star(replay_app: tuple[Replay, Any]) -> None:
    _, app = replay_app
    message = await handshake(app, headers={"origin": "https://anything.example"})
    assert message["type"] == "websocket.accept"


async def test_cross_origin_refused_over_the_in_process_socket(replay_app: tuple[Replay, Any]) -> None:
    replay, app = replay_app
    await refused_handshake(app, headers={"origin": "http://evil.example"})
    assert replay.stats()["connections"] == 0


def test_allowed_origins_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        Replay(allowed_origins="https://app.example")


# --- identify ----------------------------------------------------------------------------------------


def _identify(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    if token == "bad":
        raise Refused("bad token")
    if token == "crash":
        raise RuntimeError("identity service down")
    return token


@pytest.mark.replay(identify=_identify)
async def test_identify_over_the_in_process_socket(replay_app: tuple[Replay, Any]) -> None:
    replay, app = replay_app
    async with connect(app, path="/ws?token=alice") as c:
        sub = await c.subscribe("t")
        await c.send({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": 0})
        await c.nothing_pending()
    assert await replay.store.load_cursor("alice", "t") is not None
    await refused_handshake(app, "/ws?token=bad")
    assert replay.stats()["connections"] == 0


@pytest.mark.replay(identify=_identify)
@pytest.mark.parametrize("denial_extension", [True, False])
async def test_identify_outcomes(replay_app: tuple[Replay, Any], denial_extension: bool) -> None:
    _, app = replay_app
    assert (await handshake(app, query=b"token=alice", denial_extension=denial_extension))["type"] == "websocket.accept"
    refused = await handshake(app, query=b"token=bad", denial_extension=denial_extension)
    # Refused: a close before accept, which every ASGI server answers with 403
    assert refused["type"] == "websocket.close"
    crashed = await handshake(app, query=b"token=crash", denial_extension=denial_extension)
    if denial_extension:
        assert (crashed["type"], crashed["status"]) == ("websocket.http.response.start", 500)
    else:
        assert crashed["type"] == "websocket.close"


async def _async_identify(websocket: WebSocket) -> str | None:
    await anyio.lowlevel.checkpoint()
    if websocket.query_params.get("token") == "bad":
        raise Refused()
    return "user-from-async"


@pytest.mark.replay(identify=_async_identify)
async def test_async_identify(replay_app: tuple[Replay, Any]) -> None:
    replay, app = replay_app
    assert (await handshake(app))["type"] == "websocket.accept"
    assert (await handshake(app, query=b"token=bad"))["type"] == "websocket.close"
    async with connect(app) as c:
        sub = await c.subscribe("t")
        await c.send({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": 0})
        await c.nothing_pending()
    assert await replay.store.load_cursor("user-from-async", "t") is not None


@pytest.mark.parametrize("identity", [42, ""], ids=["not-a-string", "empty"])
async def test_identify_returning_a_non_string_or_empty_refuses(identity: object) -> None:
    # "" would be one identity shared by every such user: their stored cursors would mix.
    replay = Replay(MemoryStore(), authorize=allow_all, identify=lambda ws: identity)
    async with replay:
        message = await handshake(make_app(replay))
    assert (message["type"], message.get("status")) == ("websocket.http.response.start", 500)


async def test_not_running_refuses_with_503() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    app = make_app(replay)
    message = await handshake(app)
    assert (message["type"], message.get("status")) == ("websocket.http.response.start", 503)
