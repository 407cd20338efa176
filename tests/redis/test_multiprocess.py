"""Several processes on one Redis: uvicorn workers A and B, a publish-only worker.

Real sockets end to end: ``websockets`` clients, uvicorn subprocesses running
``tests.redis.app``, a redis-server the fixtures started.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from starlette_replay import RedisStore, Replay, StoreUnavailable
from starlette_replay.protocol import EventFrame, Subscribed, parse_server_frame
from tests.redis_server import RedisServer
from tests.servers import REPO_ROOT, ServerFactory, UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]


async def open_client(url: str) -> ClientConnection:
    with anyio.fail_after(10):
        return await connect(url, subprotocols=["replay.v1"], open_timeout=10)  # type: ignore[list-item]


async def subscribe(ws: ClientConnection, topic: str, cursor: tuple[str, int] | None = None) -> Subscribed:
    frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
    if cursor is not None:
        frame.update(epoch=cursor[0], offset=cursor[1])
    await ws.send(json.dumps(frame))
    with anyio.fail_after(10):
        reply = parse_server_frame(await ws.recv())
    assert isinstance(reply, Subscribed), reply
    return reply


async def events(ws: ClientConnection, count: int) -> list[EventFrame]:
    got: list[EventFrame] = []
    with anyio.fail_after(15):
        while len(got) < count:
            frame = parse_server_frame(await ws.recv())
            if isinstance(frame, EventFrame):
                got.append(frame)
    return got


async def publish_via(server: UvicornServer, topic: str, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        response = await http.post(f"/publish/{topic}", json={"count": count})
    response.raise_for_status()
    return list(response.json()["offsets"])


def start_web(servers: ServerFactory, redis_url: str, prefix: str, name: str) -> UvicornServer:
    """One uvicorn process running ``tests.redis.app`` on ``redis_url`` (blocking: run it in a thread)."""
    env = {"REPLAY_REDIS_URL": redis_url, "REPLAY_PREFIX": prefix}
    return servers(name=name, app="tests.redis.app:make_app", env=env)


def two_workers(redis_server: RedisServer, servers: ServerFactory) -> tuple[str, UvicornServer, UvicornServer]:
    prefix = f"mp{secrets.token_hex(4)}"
    return prefix, start_web(servers, redis_server.url, prefix, "a"), start_web(servers, redis_server.url, prefix, "b")


async def test_published_in_a_received_in_b_then_resumed_on_b_after_leaving_a(
    redis_server: RedisServer, uvicorn_servers: ServerFactory
) -> None:
    _, a, b = await anyio.to_thread.run_sync(two_workers, redis_server, uvicorn_servers)
    async with await open_client(b.ws_url()) as on_b:
        fresh = await subscribe(on_b, "room")
        assert (fresh.offset, fresh.resumed, fresh.recovered) == (0, False, False)
        assert await publish_via(a, "room", 3) == [1, 2, 3]
        assert [(e.offset, e.data) for e in await events(on_b, 3)] == [(1, {"n": 0}), (2, {"n": 1}), (3, {"n": 2})]

    # a client on A leaves after offset 3; more is published; it comes back on B
    async with await open_client(a.ws_url()) as on_a:
        await subscribe(on_a, "room", (fresh.epoch, 0))
        seen = await events(on_a, 3)
    assert [e.offset for e in seen] == [1, 2, 3]
    assert await publish_via(a, "room", 3) == [4, 5, 6]
    async with await open_client(b.ws_url()) as on_b:
        resumed = await subscribe(on_b, "room", (fresh.epoch, 3))
        assert (resumed.epoch, resumed.offset, resumed.resumed, resumed.recovered, resumed.replayed) == (
            fresh.epoch,
            6,
            True,
            True,
            3,
        )
        assert [e.offset for e in await events(on_b, 3)] == [4, 5, 6]
        # and it stays live on B for what A publishes next
        assert await publish_via(a, "room", 1) == [7]
        assert [e.offset for e in await events(on_b, 1)] == [7]


async def test_a_publish_only_worker_reaches_clients_of_a_web_worker(
    redis_server: RedisServer, uvicorn_servers: ServerFactory
) -> None:
    prefix = f"mp{secrets.token_hex(4)}"
    web = await anyio.to_thread.run_sync(start_web, uvicorn_servers, redis_server.url, prefix, "web")
    async with await open_client(web.ws_url()) as ws:
        subscribed = await subscribe(ws, "jobs")
        command = [sys.executable, "-m", "tests.redis.publish_worker", redis_server.url, prefix, "jobs", "20"]
        result = await anyio.run_process(command, cwd=REPO_ROOT, check=False)
        assert result.returncode == 0, result.stderr.decode()
        epoch, first, last = result.stdout.decode().split()
        assert (epoch, int(first), int(last)) == (subscribed.epoch, 1, 20)
        got = await events(ws, 20)
        assert [(e.offset, e.event, e.data) for e in got] == [(i + 1, "work", {"n": i}) for i in range(20)]


@dataclass
class StreamingClient:
    """Reads a topic, and on a dropped socket resumes from its cursor on the next URL."""

    urls: list[str]
    topic: str
    offsets: list[int] = field(default_factory=list)
    subscribed: list[Subscribed] = field(default_factory=list)
    epoch: str | None = None

    stopping: bool = False
    ws: ClientConnection | None = None

    async def run(self, changed: Callable[[], None]) -> None:
        for url in self.urls:
            try:
                async with await open_client(url) as ws:
                    self.ws = ws
                    cursor = (self.epoch, self.offsets[-1] if self.offsets else 0) if self.epoch else None
                    reply = await subscribe(ws, self.topic, cursor)  # type: ignore[arg-type]
                    self.subscribed.append(reply)
                    self.epoch = reply.epoch
                    changed()
                    async for message in ws:
                        frame = parse_server_frame(message)
                        if isinstance(frame, EventFrame):
                            self.offsets.append(frame.offset)
                            changed()
            except (ConnectionClosed, OSError):
                pass
            if self.stopping:
                return
        raise AssertionError("ran out of servers")

    async def stop(self) -> None:
        """Close the socket cleanly (a cancelled ``async with`` could not) and let ``run`` return."""
        self.stopping = True
        if self.ws is not None:
            with anyio.fail_after(10):
                await self.ws.close()


async def test_sigkill_of_a_worker_while_clients_stream_they_resume_on_the_other(
    redis_server: RedisServer, uvicorn_servers: ServerFactory
) -> None:
    prefix, a, b = await anyio.to_thread.run_sync(two_workers, redis_server, uvicorn_servers)
    clients = [StreamingClient([a.ws_url(), b.ws_url()], "feed") for _ in range(4)]
    progress = anyio.Event()

    def changed() -> None:
        nonlocal progress
        progress.set()
        progress = anyio.Event()

    async def until(condition: Callable[[], bool], within: float = 20) -> None:
        with anyio.fail_after(within):
            while not condition():
                await progress.wait()

    published: list[int] = []
    killed = anyio.Event()
    done = anyio.Event()
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    async with Replay(store) as publisher, anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(client.run, changed)
        await until(lambda: all(c.subscribed for c in clients))

        async def publish() -> None:
            after_kill = 0
            while after_kill < 100:
                published.append((await publisher.publish("feed", "tick", {"i": len(published)})).offset)
                after_kill += killed.is_set()
                await anyio.sleep(0.003)  # pacing the feed, not synchronising
            done.set()
            changed()

        tg.start_soon(publish)
        await until(lambda: all(len(c.offsets) >= 30 for c in clients))
        await anyio.to_thread.run_sync(a.kill)
        killed.set()
        await until(lambda: done.is_set() and all(c.offsets[-1:] == published[-1:] for c in clients))
        for client in clients:
            await client.stop()
    total = len(published)
    assert published == list(range(1, total + 1))
    for client in clients:
        assert client.offsets == list(range(1, total + 1))
        first, second = client.subscribed
        assert (first.resumed, second.resumed, second.recovered) == (False, True, True)
        assert second.epoch == first.epoch


async def test_flushall_closes_live_clients_with_1013_and_they_resume_unrecovered(
    redis_server_factory: Callable[..., RedisServer], uvicorn_servers: ServerFactory
) -> None:
    server = redis_server_factory()
    web = await anyio.to_thread.run_sync(start_web, uvicorn_servers, server.url, "flush", "web")
    async with await open_client(web.ws_url()) as ws:
        before = await subscribe(ws, "t")
        assert await publish_via(web, "t", 2) == [1, 2]
        assert [e.offset for e in await events(ws, 2)] == [1, 2]
        await anyio.to_thread.run_sync(server.flushall)
        assert await publish_via(web, "t", 1) == [1]  # a new epoch
        with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    async with await open_client(web.ws_url()) as ws:
        after = await subscribe(ws, "t", (before.epoch, 2))
        assert after.epoch != before.epoch
        assert (after.resumed, after.recovered, after.offset, after.replayed) == (True, False, 1, 1)
        assert [e.offset for e in await events(ws, 1)] == [1]


async def test_a_redis_restart_under_live_clients_loses_nothing_and_keeps_their_sockets(
    redis_server_factory: Callable[..., RedisServer], uvicorn_servers: ServerFactory
) -> None:
    server = redis_server_factory(appendonly=True)
    web = await anyio.to_thread.run_sync(start_web, uvicorn_servers, server.url, "restart", "web")
    published: list[int] = []
    restarted = anyio.Event()
    async with await open_client(web.ws_url()) as ws:
        await subscribe(ws, "t")
        store = RedisStore.from_url(server.url, prefix="restart", publish_timeout=2)
        async with Replay(store) as publisher, anyio.create_task_group() as tg:

            async def publish() -> None:
                i = after = 0
                while after < 50:
                    with anyio.fail_after(30):
                        while True:
                            try:
                                event = await publisher.publish("t", "e", i, idempotency_key=f"k{i}")
                                break
                            except StoreUnavailable:
                                await anyio.sleep(0.05)  # a publisher's retry pause
                    published.append(event.offset)
                    i += 1
                    after += restarted.is_set()
                    await anyio.sleep(0.003)  # pacing the feed, not synchronising

            tg.start_soon(publish)
            got = [e.offset for e in await events(ws, 30)]
            await anyio.to_thread.run_sync(server.restart)
            restarted.set()
        got += [e.offset for e in await events(ws, len(published) - len(got))]
    assert published == list(range(1, len(published) + 1))
    assert got == published
