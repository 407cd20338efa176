"""Metrics and health through real uvicorn processes (issue 17).

One process: ``/health`` answers 200, then 503 while its Redis is frozen
(SIGSTOP), then 200 again; ``/metrics`` parses. ``uvicorn --workers 2``: each
worker serves its metrics on a port of its own (docs/operations.md's recipe),
and the two scrapes add up to what the clients did, wherever the kernel sent
each connection.

The server is another process: its state is read by polling its HTTP routes
(every 50 ms, within a stated bound), as tests/servers.py waits for a start.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.redis_server import RedisServer, free_port
from tests.servers import UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

APP = "tests.redis.health_app:make_app"
BAD_WITHIN = 6.0  # health_check_interval=1: unready about 1 s into a freeze
GOOD_WITHIN = 15.0  # back: the listener's reconnect backoff and a connect attempt may come first


def get(host: str, port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def wait_for_status(server: UvicornServer, status: int, within: float) -> dict[str, object]:
    """Poll ``/health`` until it answers ``status``; returns its JSON body."""
    deadline = time.monotonic() + within
    while True:
        code, body = get(server.host, server._port(), "/health")
        if code == status:
            found: dict[str, object] = json.loads(body)
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"/health still {code} after {within}s: {body}")
        time.sleep(0.05)  # polling a process we do not control: nothing to wait on


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_health_goes_503_while_redis_is_frozen_and_200_again(
    redis_server_factory: Callable[..., RedisServer], uvicorn_servers: Callable[..., UvicornServer]
) -> None:
    redis = redis_server_factory()
    server = uvicorn_servers(
        app=APP, env={"REPLAY_REDIS_URL": redis.url, "METRICS_PORTS": f"{free_port()}:1"}
    )  # start() returned: /health answered 200
    code, text = await anyio.to_thread.run_sync(get, server.host, server._port(), "/metrics")
    assert code == 200
    found = samples(text)
    assert found["starlette_replay_ready"] == 1
    assert found["starlette_replay_redis_reconnects_total"] == 1
    redis.freeze()
    try:
        body = await anyio.to_thread.run_sync(wait_for_status, server, 503, BAD_WITHIN)
        assert body["ready"] is False
    finally:
        redis.thaw()
    body = await anyio.to_thread.run_sync(wait_for_status, server, 200, GOOD_WITHIN)
    assert body == {"ready": True, "checks": {"replay": "running", "redis_commands": "ok", "redis_listener": "ok"}}


def free_ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that are free right now (the
    recipe's metrics port range; a range after a lone free port may hold a taken one)."""
    for _ in range(100):
        first = free_port()
        try:
            with ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} free ports in a row")


async def test_each_worker_serves_its_own_metrics_and_they_add_up(
    redis_server_factory: Callable[..., RedisServer], uvicorn_servers: Callable[..., UvicornServer]
) -> None:
    redis = redis_server_factory()
    first = free_ports_in_a_row(2)
    server = uvicorn_servers(
        app=APP,
        env={"REPLAY_REDIS_URL": redis.url, "METRICS_PORTS": f"{first}:2"},
        extra_args=("--workers", "2"),
    )
    clients = 12
    async with AsyncExitStack() as stack:
        for i in range(clients):
            ws = await stack.enter_async_context(connect(server.ws_url(), subprotocols=["replay.v1"]))  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "subscribe", "topic": f"w{i}"}))
            with anyio.fail_after(5):
                assert json.loads(await ws.recv())["type"] == "subscribed"
        # Both workers have started (each took a port); every connection is tracked.
        per_worker = []
        for port in (first, first + 1):
            with anyio.fail_after(20):
                while True:  # a worker still starting has not bound its port yet
                    try:
                        code, text = await anyio.to_thread.run_sync(get, "127.0.0.1", port, "/metrics")
                        break
                    except OSError:
                        await anyio.sleep(0.05)  # polling a process we do not control
            assert code == 200
            per_worker.append(samples(text))
    assert sum(s["starlette_replay_connections_opened_total"] for s in per_worker) == clients
    assert sum(s["starlette_replay_connections_open"] for s in per_worker) == clients
    assert sum(s["starlette_replay_subscriptions"] for s in per_worker) == clients
