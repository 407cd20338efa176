"""The README's Python examples, run for real so that the docs cannot rot.

Each example that a reader is meant to copy sits in README.md right after a
``<!-- readme-test: NAME -->`` comment. Every test here takes the code of one
such block, executes it as a module, starts the app's lifespan, connects a
WebSocket in-process (httpx-ws, one transport per client) and checks the
behaviour the README describes.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import logging
import re
import shutil
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn.protocols.websockets
from asgi_lifespan import LifespanManager
from httpx_ws import AsyncWebSocketSession, WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette

from starlette_replay import MemoryStore, Position, RedisStore, Replay, allow_all

from .client.helpers import serve
from .helpers import refused_handshake
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKED_BLOCK = re.compile(r"<!-- readme-test: ([a-z0-9-]+) -->\n```python\n(.*?)\n```", re.DOTALL)
TESTED = {
    "starlette",
    "own-lifespan",
    "fastapi",
    "python-client",
    "worker",
    "auth",
    "log-filter",
    "snapshot",
    "testing-starlette",
    "testing-async",
    "no-lifespan",
}
TIMEOUT = 5.0


def readme_blocks() -> dict[str, str]:
    """The README's marked Python blocks, by name."""
    text = README.read_text(encoding="utf-8")
    blocks: dict[str, str] = {}
    for name, code in _MARKED_BLOCK.findall(text):
        assert name not in blocks, f"two README blocks are marked {name!r}"
        blocks[name] = code
    return blocks


def load(name: str) -> types.ModuleType:
    """Execute one README block as a fresh module and return it."""
    module = types.ModuleType(f"readme_{name.replace('-', '_')}")
    module.__file__ = str(README)
    exec(compile(readme_blocks()[name], f"README.md[{name}]", "exec"), module.__dict__)
    return module


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan started, and an HTTP client for it.

    Each call makes its own transport: httpx-ws shares one scope among the
    connections of a transport, so concurrent WebSockets need one each.
    """
    async with LifespanManager(app) as manager:
        transport = ASGIWebSocketTransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@asynccontextmanager
async def websocket(client: httpx.AsyncClient, **kwargs: Any) -> AsyncIterator[AsyncWebSocketSession]:
    """A WebSocket to the app's ``/ws``, offering ``replay.v1`` unless told otherwise.

    The transport gives up on a handshake that is not answered within a second.
    """
    kwargs.setdefault("subprotocols", ["replay.v1"])
    async with aconnect_ws("/ws", client, keepalive_ping_interval_seconds=None, **kwargs) as ws:
        yield ws


async def receive(ws: AsyncWebSocketSession) -> dict[str, Any]:
    """The next server frame (heartbeat pings never come within these tests' timeouts)."""
    with anyio.fail_after(TIMEOUT):
        frame: dict[str, Any] = json.loads(await ws.receive_text())
    return frame


async def nothing_before_pong(ws: AsyncWebSocketSession, ref: str) -> None:
    """Assert that no further frame is queued: a ping's pong comes next.

    The server writes one connection's frames from one ordered queue, so any
    duplicate event already queued would arrive before the pong.
    """
    await ws.send_json({"type": "ping", "ref": ref})
    assert await receive(ws) == {"type": "pong", "ref": ref}


async def subscribe(ws: AsyncWebSocketSession, topic: str, **fields: Any) -> dict[str, Any]:
    await ws.send_json({"type": "subscribe", "topic": topic, **fields})
    frame = await receive(ws)
    assert frame["type"] == "subscribed", frame
    return frame


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own (free port, files in ``tmp_path``)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def test_marked_blocks_are_the_tested_ones() -> None:
    assert set(readme_blocks()) == TESTED


@pytest.mark.parametrize("name", sorted(TESTED))
def test_block_is_clean_for_ruff(name: str) -> None:
    """Examples are held to the project's own ruff rules and format (pyproject.toml)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff is not None
    code = readme_blocks()[name] + "\n"
    for command in (["check", "--quiet"], ["format", "--diff"]):
        result = subprocess.run(
            [ruff, *command, "--stdin-filename", f"readme_{name.replace('-', '_')}.py", "-"],
            input=code,
            capture_output=True,
            text=True,
            cwd=README.parent,
            timeout=60,
        )
        assert result.returncode == 0, f"ruff {command[0]} on README block {name!r}:\n{result.stdout}{result.stderr}"


def option_tables() -> list[dict[str, object]]:
    """The README's configuration tables: option name -> documented default, table by table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    tables: list[dict[str, object]] = []
    rows: dict[str, object] | None = None
    for line in section.splitlines():
        if line.startswith("| option | default |"):
            rows = {}
            tables.append(rows)
        elif rows is not None and line.startswith("| `"):
            match = re.match(r"\| `(\w+)` \| `([^`]+)`", line)
            assert match, line
            rows[match[1]] = ast.literal_eval(match[2])
        elif not line.startswith("|"):
            rows = None
    return tables


@pytest.mark.parametrize("index, cls", [(0, Replay), (1, MemoryStore)])
def test_configuration_tables_match_the_code(index: int, cls: type) -> None:
    """Every constructor option is in the README's table, with its real default."""
    documented = option_tables()[index]
    parameters = inspect.signature(cls).parameters
    assert list(documented) == list(parameters)
    for name, default in documented.items():
        assert parameters[name].default == default, name


async def test_starlette_quickstart() -> None:
    quickstart = load("starlette")
    async with running(quickstart.app) as client, websocket(client) as ws:
        assert ws.subprotocol == "replay.v1"
        subscribed = await subscribe(ws, "news", ref=1)
        assert subscribed == {
            "type": "subscribed",
            "topic": "news",
            "epoch": subscribed["epoch"],
            "offset": 0,
            "resumed": False,
            "recovered": False,
            "replayed": 0,
            "ref": 1,
        }
        response = await client.post("/announce")
        assert response.status_code == 200
        published = response.json()
        assert published == {"topic": "news", "epoch": subscribed["epoch"], "offset": 1}
        event = await receive(ws)
        assert event == {
            "type": "event",
            "topic": "news",
            "offset": 1,
            "event": "headline",
            "data": {"title": "Lossless pushes"},
            "time": event["time"],
        }
        assert isinstance(event["time"], int) and event["time"] > 0
        script = await client.get("/replay.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
    assert not quickstart.replay.running


async def test_own_lifespan_nests_the_replay() -> None:
    example = load("own-lifespan")
    assert not example.replay.running
    async with running(example.app) as client:
        assert example.replay.running
        async with websocket(client) as ws:
            await subscribe(ws, "t")
            await example.replay.publish("t", "tick", 1)
            assert (await receive(ws))["data"] == 1
    assert not example.replay.running


async def test_fastapi_quickstart_and_the_lost_answer() -> None:
    """The README's story: an answer published while the socket is down arrives once."""
    quickstart = load("fastapi")
    async with running(quickstart.app) as client:
        async with websocket(client) as ws:
            subscribed = await subscribe(ws, "user:42")
            epoch = subscribed["epoch"]
            response = await client.post("/users/42/answer")
            assert response.json() == {"offset": 1}
            first = await receive(ws)
            assert (first["offset"], first["event"]) == (1, "task_interaction")
        cursor = {"epoch": epoch, "offset": first["offset"]}

        # The socket is down: the agent answers, and a sync `def` handler logs.
        assert (await client.post("/users/42/answer")).json() == {"offset": 2}
        assert (await client.post("/users/42/log", params={"line": "done"})).json() == {"offset": 3}

        async with websocket(client) as ws:
            resumed = await subscribe(ws, "user:42", **cursor)
            assert (resumed["resumed"], resumed["recovered"], resumed["replayed"]) == (True, True, 2)
            assert resumed["offset"] == 3
            missed = [await receive(ws), await receive(ws)]
            assert [(e["offset"], e["event"], e["data"]) for e in missed] == [
                (2, "task_interaction", {"text": "Booked: Euljiro, 2 people, tomorrow 12:30"}),
                (3, "agent_log", {"line": "done"}),
            ]
            assert (await client.post("/users/42/log", params={"line": "live"})).json() == {"offset": 4}
            live = await receive(ws)
            assert (live["offset"], live["data"]) == (4, {"line": "live"})
            await nothing_before_pong(ws, "end")


async def test_publish_sync_refuses_the_event_loop_thread() -> None:
    quickstart = load("fastapi")
    async with running(quickstart.app):
        with pytest.raises(RuntimeError, match="event loop thread"):
            quickstart.replay.publish_sync("user:1", "agent_log", {"line": "x"})


class PositionWatch(MemoryStore):
    """A MemoryStore that says when a subscription has read the topic's head.

    Anything published after that is delivered live to that subscription.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head_read = anyio.Event()

    async def position(self, topic: str) -> Position:
        position = await super().position(topic)
        self.head_read.set()
        return position


async def test_python_client_against_real_uvicorn() -> None:
    store = PositionWatch()
    replay = Replay(store, authorize=allow_all)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    printed: list[tuple[Any, ...]] = []
    got_two = anyio.Event()

    def collect(*args: Any) -> None:
        printed.append(args)
        if len(printed) == 2:
            got_two.set()

    async with serve(app) as port:
        code = readme_blocks()["python-client"]
        assert "ws://127.0.0.1:8000/ws" in code
        example = types.ModuleType("readme_python_client")
        exec(compile(code.replace(":8000/", f":{port}/"), "README.md[python-client]", "exec"), example.__dict__)
        example.__dict__["print"] = collect
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(example.main)
                await store.head_read.wait()
                await replay.publish("user:42", "task_interaction", {"text": "Booked"})
                await replay.publish("user:42", "agent_log", {"line": "done"})
                await got_two.wait()
                tg.cancel_scope.cancel()
    assert printed == [
        ("user:42", 1, "task_interaction", {"text": "Booked"}),
        ("user:42", 2, "agent_log", {"line": "done"}),
    ]


async def test_snapshot_then_live_from_its_cursor() -> None:
    example = load("snapshot")
    async with running(example.app) as client:
        empty = (await client.get("/users/7/snapshot")).json()
        assert empty["events"] == [] and empty["cursor"]["offset"] == 0
        await example.replay.publish_many("user:7", [("message", {"n": n}) for n in range(1, 4)])
        snapshot = (await client.get("/users/7/snapshot")).json()
        assert snapshot["topic"] == "user:7"
        assert snapshot["cursor"] == {"epoch": empty["cursor"]["epoch"], "offset": 3}
        assert snapshot["events"] == [{"offset": n, "event": "message", "data": {"n": n}} for n in range(1, 4)]
        await example.replay.publish("user:7", "message", {"n": 4})  # after the snapshot
        async with websocket(client) as ws:
            subscribed = await subscribe(ws, "user:7", **snapshot["cursor"])
            assert (subscribed["recovered"], subscribed["replayed"]) == (True, 1)
            missed = await receive(ws)
            assert (missed["offset"], missed["data"]) == (4, {"n": 4})
            await nothing_before_pong(ws, "end")


async def test_worker_publishes_to_a_web_process_through_redis(redis_url: str) -> None:
    """The worker block, on a real Redis, reaches a client of another Replay on the same Redis."""
    code = readme_blocks()["worker"]
    assert "redis://localhost:6379/0" in code
    worker = types.ModuleType("readme_worker")
    exec(compile(code.replace("redis://localhost:6379/0", redis_url), "README.md[worker]", "exec"), worker.__dict__)

    web = Replay(store=RedisStore.from_url(redis_url), authorize=allow_all)
    app = Starlette(routes=[web.route("/ws")], lifespan=web.lifespan)
    async with running(app) as client, websocket(client) as ws:
        subscribed = await subscribe(ws, "user:42")
        with anyio.fail_after(TIMEOUT):
            await worker.main()
        events = [await receive(ws), await receive(ws)]
        assert [(e["offset"], e["event"], e["data"]) for e in events] == [
            (subscribed["offset"] + 1, "agent_log", {"line": "searching tables..."}),
            (subscribed["offset"] + 2, "task_interaction", {"text": "Booked"}),
        ]
        await nothing_before_pong(ws, "end")
        assert [e.offset for e in await web.history("user:42")] == [1, 2]
    assert not worker.replay.running


async def test_auth_refuses_a_handshake_without_credentials() -> None:
    example = load("auth")
    async with running(example.app) as client:
        with pytest.raises(WebSocketDisconnect) as refused:
            async with websocket(client):
                pass
        assert refused.value.code == 1008  # closed before accept: HTTP 403 behind uvicorn
        assert example.replay.stats()["connections"] == 0


async def test_auth_bearer_token_in_the_subprotocol() -> None:
    example = load("auth")
    async with running(example.app) as client:
        # httpx-ws joins subprotocols with ", " and its ASGI transport splits on ","
        # without stripping; a real server strips. Send the header as a browser would.
        offered = {"sec-websocket-protocol": "replay.v1,bearer.tok_8f2b1c"}
        async with websocket(client, subprotocols=None, headers=offered) as ws:
            assert ws.subprotocol == "replay.v1"  # the token is never echoed
            await subscribe(ws, "user:42")
            await ws.send_json({"type": "subscribe", "topic": "user:7", "ref": "other"})
            refused = await receive(ws)
            assert (refused["type"], refused["code"], refused["topic"], refused["ref"]) == (
                "error",
                "forbidden",
                "user:7",
                "other",
            )
            await example.replay.publish("user:42", "note", {"n": 1})
            assert (await receive(ws))["data"] == {"n": 1}
        with pytest.raises(WebSocketDisconnect):
            async with websocket(client, subprotocols=None, headers={"sec-websocket-protocol": "replay.v1,bearer.x"}):
                pass


async def test_auth_cookie_session_and_stored_cursor() -> None:
    """With an identity, an acked cursor is stored: a reconnect without one resumes."""
    example = load("auth")
    async with running(example.app) as client:
        assert (await client.post("/login")).json() == {"user": "42"}
        async with websocket(client) as ws:
            subscribed = await subscribe(ws, "user:42")
            assert subscribed["resumed"] is False
            await example.replay.publish("user:42", "task_interaction", {"text": "first"})
            event = await receive(ws)
            await ws.send_json({"type": "ack", "topic": "user:42", "epoch": subscribed["epoch"], "offset": 1})
            await nothing_before_pong(ws, "acked")  # frames are handled in order: the ack is stored
        await example.replay.publish("user:42", "task_interaction", {"text": "while away"})
        async with websocket(client) as ws:
            resumed = await subscribe(ws, "user:42")  # no cursor sent: the stored one is used
            assert (resumed["resumed"], resumed["recovered"], resumed["replayed"]) == (True, True, 1)
            again = await receive(ws)
            assert (again["offset"], again["data"]) == (2, {"text": "while away"})
            assert event["offset"] == 1
            await nothing_before_pong(ws, "end")


def test_log_filter_strips_query_strings() -> None:
    # The filter relies on uvicorn's message format and logger, in each of its
    # WebSocket implementations: check both are still so (read, not imported:
    # importing the legacy one warns).
    folder = Path(uvicorn.protocols.websockets.__file__).parent
    for impl in ("websockets_impl.py", "websockets_sansio_impl.py", "wsproto_impl.py"):
        source = (folder / impl).read_text(encoding="utf-8")
        assert "'%s - \"WebSocket %s\" [accepted]'" in source, impl
        assert 'logging.getLogger("uvicorn.error")' in source, impl

    logger = logging.getLogger("uvicorn.error")
    before = list(logger.filters)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        load("log-filter")
        logger.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:51016", "/ws?token=SECRET123")
        logger.info('%s - "WebSocket %s" 403', "127.0.0.1:51016", "/ws")
        logger.info("Started server process [%d]", 7)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.filters[:] = before
    assert [r.getMessage() for r in records] == [
        '127.0.0.1:51016 - "WebSocket /ws" [accepted]',
        '127.0.0.1:51016 - "WebSocket /ws" 403',
        "Started server process [7]",
    ]


def test_testing_your_app_with_starlettes_testclient() -> None:
    # A plain function, as the README shows it: the TestClient runs the app in a thread of its own.
    load("testing-starlette").test_news_arrives()


async def test_testing_your_app_async() -> None:
    await load("testing-async").test_news_arrives_async()


async def test_a_server_without_lifespan_starts_the_replay_on_the_first_request() -> None:
    # No LifespanManager here: the app gets no lifespan events, as under daphne.
    module = load("no-lifespan")
    assert not module.replay.running
    transport = ASGIWebSocketTransport(app=module.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            async with websocket(client) as ws:
                await subscribe(ws, "news")
                assert module.replay.running
                await module.replay.publish("news", "headline", {"n": 1})
                event = await receive(ws)
                assert (event["type"], event["offset"], event["data"]) == ("event", 1, {"n": 1})
    finally:
        task = module.app.task
        assert task is not None
        task.cancel()  # what the process's end does under daphne; here the lifespan shuts down cleanly
        with anyio.fail_after(TIMEOUT):
            await asyncio.wait([task])
    assert task.cancelled() and not module.replay.running


async def test_a_failed_startup_without_lifespan_fails_the_requests_instead_of_hanging_them() -> None:
    module = load("no-lifespan")

    @asynccontextmanager
    async def broken(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("the database is down")
        yield

    app = module.LifespanOnFirstRequest(Starlette(routes=[module.replay.route("/ws")], lifespan=broken))
    transport = ASGIWebSocketTransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(2):  # every request, not only the first
            with anyio.fail_after(TIMEOUT), pytest.raises(Exception, match="database is down"):
                await client.get("/")
    assert app.task.done() and not module.replay.running


async def test_a_handshake_before_the_replay_runs_says_how_to_start_it(caplog: pytest.LogCaptureFixture) -> None:
    replay = Replay(authorize=allow_all)
    app = Starlette(routes=[replay.route("/ws")], lifespan=replay.lifespan)
    with caplog.at_level(logging.ERROR, logger="starlette_replay.endpoint"):
        await refused_handshake(app)  # no lifespan ran
    assert "lifespan=replay.lifespan" in caplog.text
    assert "Servers without a lifespan" in caplog.text  # the README's way for daphne
