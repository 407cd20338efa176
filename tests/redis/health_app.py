"""The app tests/redis/test_health_e2e.py runs under uvicorn: one Replay on Redis with its
metrics and health routes, and docs/operations.md's metrics port per worker.

Configured by environment: ``REPLAY_REDIS_URL``, ``REPLAY_PREFIX``, and
``METRICS_PORTS`` (``first:count``: each worker serves its metrics on the first
free port of that range, as the recipe for ``uvicorn --workers`` does).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, start_http_server
from starlette.applications import Starlette

from starlette_replay import RedisStore, Replay, allow_all


def make_app() -> Starlette:
    store = RedisStore.from_url(
        os.environ["REPLAY_REDIS_URL"],
        prefix=os.environ.get("REPLAY_PREFIX", "replay"),
        publish_timeout=3,
        health_check_interval=1,
    )
    replay = Replay(store, authorize=allow_all)
    first, count = (int(part) for part in os.environ["METRICS_PORTS"].split(":"))
    metrics_ports = range(first, first + count)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with replay:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(replay.collector())
            for port in metrics_ports:
                try:
                    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
                    break
                except OSError:  # taken by another worker
                    continue
            else:
                raise RuntimeError(f"no free metrics port in {metrics_ports}")
            try:
                yield
            finally:
                server.shutdown()
                server.server_close()
                thread.join()

    return Starlette(
        routes=[replay.route("/ws"), replay.health_route("/health"), replay.metrics_route("/metrics")],
        lifespan=lifespan,
    )
