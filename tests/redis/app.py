"""The app the multi-process tests run under uvicorn: one Replay on a shared Redis.

Configured by environment: ``REPLAY_REDIS_URL``, ``REPLAY_PREFIX``, ``REPLAY_REDIS_CLUSTER``
(``1``: the URL names a node of a Redis Cluster). Routes:
``/ws`` (the replay route), ``GET /health``, ``POST /publish/{topic}`` with a JSON
body ``{"event": str, "data": any, "count": int}`` (publishes ``count`` events
with ``data`` set to ``{"n": i}`` when ``data`` is missing) returning the stored
offsets.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from starlette_replay import RedisStore, Replay, allow_all


def make_app() -> Starlette:
    store = RedisStore.from_url(
        os.environ["REPLAY_REDIS_URL"],
        prefix=os.environ.get("REPLAY_PREFIX", "replay"),
        publish_timeout=5,
        health_check_interval=1,
        cluster=os.environ.get("REPLAY_REDIS_CLUSTER") == "1",
    )
    replay = Replay(store, authorize=allow_all, heartbeat_interval=5)

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        topic = request.path_params["topic"]
        count = int(body.get("count", 1))
        items = [(body.get("event", "e"), body.get("data", {"n": i})) for i in range(count)]
        events = await replay.publish_many(topic, items)
        return JSONResponse({"epoch": events[0].epoch, "offsets": [e.offset for e in events]})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/publish/{topic:path}", publish, methods=["POST"]),
            replay.route("/ws"),
        ],
        lifespan=replay.lifespan,
    )
