"""Contender "socketio-redis": python-socketio with AsyncRedisManager.

Runs in its own venv (bench/.venvs/socketio). Every connected client is in the
default namespace; a publish is ``sio.emit("tick", data, room=topic)`` through
the Redis manager (so it goes through Redis pub/sub, as in a multi-process
deployment). A client joins the topic's room with a ``subscribe`` event and gets
a ``subscribed`` event back.
"""

from __future__ import annotations

import os
from typing import Any

import socketio
from _common import TOPIC_EVENT, drive, drive_topics, query_params, topics_params
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

manager = socketio.AsyncRedisManager(os.environ["BENCH_REDIS_URL"])
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins="*")


@sio.on("subscribe")
async def subscribe(sid: str, data: Any) -> None:
    topic = data.get("topic", "bench") if isinstance(data, dict) else "bench"
    await sio.enter_room(sid, topic)
    await sio.emit("subscribed", {"topic": topic}, to=sid)


async def publish(request: Request) -> JSONResponse:
    topic, n, rate = query_params(request.query_params)

    async def one(i: int, data: dict[str, Any]) -> None:
        await sio.emit(TOPIC_EVENT, data, room=topic)

    return JSONResponse(await drive(one, n, rate))


async def publish_topics(request: Request) -> JSONResponse:
    topics, n = topics_params(request.query_params)

    async def one(topic: str, i: int, data: dict[str, Any]) -> None:
        await sio.emit(TOPIC_EVENT, data, room=topic)

    return JSONResponse(await drive_topics(one, topics, n))


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


http_app = Starlette(
    routes=[
        Route("/publish", publish, methods=["POST"]),
        Route("/publish-topics", publish_topics, methods=["POST"]),
        Route("/health", health),
    ]
)
app = socketio.ASGIApp(sio, other_asgi_app=http_app)
