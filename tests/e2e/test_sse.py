"""The SSE route end to end: a real uvicorn process, a raw HTTP/1.1 client on a real socket.

Events stored while away and resumed with ``Last-Event-ID``; a reconnect right
after ``subscribed`` (before any event); resumes under publish load (no gap,
no duplicate); several topics on one stream; a slow consumer ended and
resumed; refusals as HTTP statuses on the wire; and the same under hypercorn
and granian. Every stream is checked frame by frame by ``SSESubscriber``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import anyio
import httpx
import pytest

from tests.servers import ServerFactory, UvicornServer
from tests.sse_client import RawStream, SSESubscriber, query

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def _subscriber(server: UvicornServer, topics: list[str], name: str = "sse") -> SSESubscriber:
    assert server.port is not None
    return SSESubscriber(server.host, server.port, topics, name=name)


async def _publish(http: httpx.AsyncClient, topic: str, count: int = 1, **more: Any) -> dict[str, Any]:
    response = await http.post("/publish", json={"topic": topic, "count": count, **more})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def test_events_stored_while_away_are_resumed_with_last_event_id(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env=store_env)
    tab = _subscriber(server, ["away"])
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(30):
            await tab.connect()
            assert tab.stream is not None
            assert tab.stream.response_headers["content-type"] == "text/event-stream; charset=utf-8"
            first = await tab.stream.next()
            assert first is not None and first.retry is not None  # the stream opens with retry:
            await tab.recv()  # subscribed
            await _publish(http, "away", 3)
            await tab.read_until({"away": 3})
            await tab.drop()
            await _publish(http, "away", 5)
            await tab.connect()  # with Last-Event-ID
            await tab.read_until({"away": 8})
            again = tab.last_subscribed("away")
            assert (again["resumed"], again["recovered"], again["replayed"]) == (True, True, 5)
            await tab.drop()
    tab.assert_exact({"away": 8})


async def test_a_reconnect_right_after_subscribed_resumes_where_it_was(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env=store_env)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        await _publish(http, "early", 4)
        await _publish(http, "early-b", 2)
        tab = _subscriber(server, ["early", "early-b"])
        with anyio.fail_after(30):
            await tab.connect(rewind=1)
            first = await tab.recv()
            assert first is not None and first["type"] == "subscribed"
            assert (first["offset"], first["replayed"]) == (4, 1)
            # Gone before any event of the stream: the id says "just before offset 4" for the first
            # topic and nothing yet for the second.
            assert tab.last_id == f"{first['epoch']}:3,"
            await tab.abort()
            await _publish(http, "early", 2)
            await _publish(http, "early-b", 1)
            await tab.connect()
            await tab.read_until({"early": 6})
            while len(tab.subscribed) < 3:
                await tab.recv()
            resumed = tab.last_subscribed("early")
            assert (resumed["resumed"], resumed["recovered"], resumed["replayed"]) == (True, True, 3)
            # The second topic had no entry yet: a fresh subscription from its head, as asked the first time.
            fresh = tab.last_subscribed("early-b")
            assert (fresh["topic"], fresh["resumed"], fresh["offset"], fresh["replayed"]) == ("early-b", False, 3, 0)
            await _publish(http, "early-b", 1)
            await tab.read_until({"early-b": 4})
            await tab.drop()
    assert not tab.violations, tab.violations
    assert tab.delivered["early"] == [4, 5, 6]
    assert tab.delivered["early-b"] == [4]


async def test_resumes_under_publish_load_lose_nothing_and_repeat_nothing(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env={**store_env, "REPLAY_POSITION_DELAY": "0.02"})
    topics = ["load-a", "load-b", "load-c"]
    tab = _subscriber(server, topics, name="tab")
    steady = _subscriber(server, topics, name="steady")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
        with anyio.fail_after(60):
            for client in (tab, steady):
                await client.connect()
            pump = (await http.post("/pump", json={"topics": topics, "count": 300, "interval": 0.001})).json()["id"]
            for round_ in range(6):
                target = {t: tab.offset(t) + 15 for t in topics}
                await tab.read_until(target)
                if round_ % 2:
                    await tab.abort()
                else:
                    await tab.drop()
                await tab.connect()
            done = (await http.post(f"/pump/{pump}/wait")).json()
            heads = {t: done[t]["last"] for t in topics}
            assert set(heads.values()) == {300}
            for client in (tab, steady):
                await client.read_until(heads)
                await client.drop()
    assert tab.streams == 7
    for client in (tab, steady):
        client.assert_exact(heads)


async def test_several_topics_on_one_stream_interleave_with_ids_for_all(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_STORE": "memory"})
    topics = [f"many-{i}" for i in range(10)]
    tab = _subscriber(server, topics)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(30):
            await tab.connect()
            for _ in topics:
                await tab.recv()
            for i, topic in enumerate(topics):
                await _publish(http, topic, i + 1)
            await tab.read_until({t: i + 1 for i, t in enumerate(topics)})
            assert tab.last_id is not None
            entries = tab.last_id.split(",")
            assert [int(e.split(":")[1]) for e in entries] == [i + 1 for i in range(10)]
            await tab.drop()
            for topic in topics[::3]:
                await _publish(http, topic, 2)
            await tab.connect()
            await tab.read_until({t: i + 1 + (2 if i % 3 == 0 else 0) for i, t in enumerate(topics)})
            assert all(tab.last_subscribed(t)["recovered"] for t in topics[1:])
            await tab.drop()
    tab.assert_exact({t: i + 1 + (2 if i % 3 == 0 else 0) for i, t in enumerate(topics)})


async def test_a_slow_consumer_is_ended_and_resumes(uvicorn_servers: ServerFactory, store_env: dict[str, str]) -> None:
    server = uvicorn_servers(env={**store_env, "REPLAY_SEND_QUEUE_SIZE": "200"})
    slow = _subscriber(server, ["slow"], name="slow")
    fast = _subscriber(server, ["slow"], name="fast")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
        with anyio.fail_after(60):
            await slow.connect(rcvbuf=4096)
            await slow.recv()
            await fast.connect()
            await fast.recv()
            # The slow one stops reading; 2,000 events of 2 KB fill its socket, then its queue.
            await _publish(http, "slow", 2000, size=2000)
            while not await fast.read_until_or_end({"slow": 2000}):
                await fast.connect()  # a reader in Python on a busy machine may be too slow now and then
            ended = await slow.read_until_or_end({"slow": 2000})
            assert not ended, "the slow stream was never ended"
            stats = (await http.get("/stats")).json()
            assert stats["connections"] == 1  # the slow stream is gone; the fast one stays
            await slow.connect()
            await slow.read_until({"slow": 2000})
            resumed = slow.last_subscribed("slow")
            assert (resumed["resumed"], resumed["recovered"]) == (True, True)
            for client in (slow, fast):
                await client.drop()
    for client in (slow, fast):
        client.assert_exact({"slow": 2000})
    assert "slow consumer" in server.log_text()


@pytest.mark.parametrize(
    ("target", "headers", "status", "code"),
    [
        ("/sse", {}, 400, "bad_request"),
        ("/sse?" + query(["a", "a"]), {}, 400, "bad_request"),
        ("/sse?" + query(["a"]), {"Last-Event-ID": "x" * 10_000}, 400, "bad_request"),
        ("/sse?" + query(["a"]), {"Last-Event-ID": "e:1,"}, 400, "bad_request"),
        ("/sse?" + query(["forbidden-1"]), {}, 403, "forbidden"),
        ("/sse?" + query(["a"], identity="refuse"), {}, 403, "forbidden"),
        ("/sse?" + query(["a"]), {"Origin": "https://evil.example"}, 403, "forbidden"),
    ],
)
async def test_refusals_on_the_wire(
    uvicorn_servers: ServerFactory, target: str, headers: dict[str, str], status: int, code: str
) -> None:
    server = uvicorn_servers(env={"REPLAY_STORE": "memory"})
    assert server.port is not None
    stream = RawStream(server.host, server.port, target, headers)
    with anyio.fail_after(10):
        await stream.connect()
        assert stream.status == status
        assert stream.response_headers["content-type"] == "application/json"
        import json

        body = json.loads(await stream.read_body())
        assert (body["type"], body["code"]) == ("error", code)
        await stream.aclose()


async def test_fastapi_add_route_serves_the_stream(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(app="tests.e2e.apps:make_fastapi_app", env={"REPLAY_STORE": "memory"})
    tab = _subscriber(server, ["fa"])
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(30):
            await tab.connect()
            await tab.recv()
            response = await http.post("/fastapi/publish", params={"topic": "fa", "tag": "x"})
            response.raise_for_status()
            await tab.read_until({"fa": 1})
            assert tab.data["fa"] == [{"tag": "x", "via": "async"}]
            await tab.drop()
    tab.assert_exact({"fa": 1})


def _kind(name: str, module: str) -> object:
    installed = importlib.util.find_spec(module) is not None
    return pytest.param(
        name, marks=pytest.mark.skipif(not installed, reason=f"{module} is not installed: make setup installs it")
    )


SERVERS = [
    _kind("uvicorn", "uvicorn"),
    _kind("hypercorn", "hypercorn"),
    _kind("hypercorn-trio", "trio"),
    _kind("granian", "granian"),
    _kind("daphne", "daphne"),
]


def _server_options(kind: str) -> dict[str, Any]:
    if kind == "daphne":  # no lifespan: the README's LifespanOnFirstRequest (tests/e2e/daphne_app.py)
        return {"server": "daphne", "app": "tests.e2e.daphne_app:app", "factory": False}
    return {"server": kind}


@pytest.mark.parametrize("kind", SERVERS)
async def test_the_sse_promise_under_each_server(uvicorn_servers: ServerFactory, kind: str) -> None:
    server = uvicorn_servers(**_server_options(kind), env={"REPLAY_STORE": "memory"}, allow_errors=kind == "hypercorn")
    tab = _subscriber(server, ["srv", "srv-2"], name="tab")
    other = _subscriber(server, ["srv", "srv-2"], name="other")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
        with anyio.fail_after(60):
            assert server.port is not None
            refused = RawStream(server.host, server.port, "/sse?" + query(["a"]), {"Origin": "https://evil.example"})
            await refused.connect()
            assert refused.status == 403
            await refused.aclose()

            for client in (tab, other):
                await client.connect()
                await client.recv()
                await client.recv()
            await _publish(http, "srv", 3)
            await tab.read_until({"srv": 3})
            await tab.drop()
            await _publish(http, "srv", 5)
            await tab.connect()
            await tab.read_until({"srv": 8})
            assert tab.last_subscribed("srv")["replayed"] == 5

            pump = (await http.post("/pump", json={"topics": ["srv", "srv-2"], "count": 200, "interval": 0.002})).json()
            for _ in range(3):
                await tab.read_until({"srv": tab.offset("srv") + 20})
                await tab.abort()
                await tab.connect()
            done = (await http.post(f"/pump/{pump['id']}/wait")).json()
            heads = {"srv": done["srv"]["last"], "srv-2": done["srv-2"]["last"]}
            assert heads == {"srv": 208, "srv-2": 200}
            for client in (tab, other):
                await client.read_until(heads)
                await client.drop()
    for client in (tab, other):
        client.assert_exact(heads)
    frames = [line for line in server.log_text().splitlines() if "/starlette_replay/" in line]
    assert not frames, f"tracebacks through the library in the {kind} log: {frames[:5]}"


@pytest.mark.redis
async def test_a_server_restart_ends_the_stream_and_the_client_resumes(
    uvicorn_servers: ServerFactory, redis_server: Any
) -> None:
    # uvicorn waits for HTTP responses before it shuts down: an SSE stream holds it until
    # --timeout-graceful-shutdown (3 s here), then uvicorn cancels it (logged at ERROR by uvicorn).
    env = {"REPLAY_STORE": "redis", "REPLAY_REDIS_URL": redis_server.url, "REPLAY_REDIS_PREFIX": "sse-restart"}
    server = uvicorn_servers(env=env, allow_errors=True)
    tab = _subscriber(server, ["restart"])
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(60):
            await tab.connect()
            await tab.recv()
            await _publish(http, "restart", 3)
            await tab.read_until({"restart": 3})
        server.terminate()
        with anyio.fail_after(15):
            assert await tab.recv() is None  # the body ends (or the connection drops)
        server.wait(15)
        await server.astart()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(30):
            await _publish(http, "restart", 2)
            await tab.connect()
            await tab.read_until({"restart": 5})
            resumed = tab.last_subscribed("restart")
            assert (resumed["resumed"], resumed["recovered"], resumed["replayed"]) == (True, True, 2)
            await tab.drop()
    tab.assert_exact({"restart": 5})


@pytest.mark.parametrize("kind", SERVERS)
async def test_shutdown_ends_open_streams_within_a_bound(uvicorn_servers: ServerFactory, kind: str) -> None:
    # What each server does differs and is recorded, not required: uvicorn waits for open
    # responses until --timeout-graceful-shutdown (3 s here), then cancels them (and logs that at
    # ERROR, with the stream's frames in the traceback); granian waits for them without end
    # unless --workers-kill-timeout is given. The stream must end either way.
    extra = ("--workers-kill-timeout", "3") if kind == "granian" else ()
    server = uvicorn_servers(
        **_server_options(kind), env={"REPLAY_STORE": "memory"}, allow_errors=True, extra_args=extra
    )
    tab = _subscriber(server, ["bye"])
    with anyio.fail_after(20):
        await tab.connect()
        await tab.recv()
    if kind == "hypercorn" and sys.version_info >= (3, 12):
        pytest.xfail("hypercorn's asyncio worker waits on SIGTERM until every client leaves on Python 3.12+")
    server.terminate()
    with anyio.fail_after(15):
        assert await tab.recv(within=15) is None  # the body ends, or the connection drops
    server.wait(15)
    await tab.drop()
    assert not tab.violations, tab.violations
