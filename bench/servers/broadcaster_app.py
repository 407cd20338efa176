"""Contenders "broadcaster-redis" and "broadcaster-stream": encode/broadcaster 0.3.1.

Runs in its own venv (bench/.venvs/broadcaster) with redis-py < 8: broadcaster
0.3.1 delivers nothing with redis-py 8. ``BENCH_BROADCAST_URL`` is a
``redis://`` or ``redis-stream://`` URL. Each socket holds one broadcaster
subscription and forwards its messages; a publish is ``broadcast.publish``
with the JSON encoded once. Subscriptions are entered under a lock: two
sockets subscribing to a new channel at once race inside broadcaster 0.3.1
(one of them would never get a message). And one idle subscription is held
for the server's lifetime (see ``lifespan``).
"""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from _common import TOPIC_EVENT, drive, drive_topics, query_params, topics_params
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

broadcast = Broadcast(os.environ["BENCH_BROADCAST_URL"])
subscribe_lock = asyncio.Lock()


@asynccontextmanager
async def lifespan(app: Starlette) -> Any:
    await broadcast.connect()
    try:
        # broadcaster 0.3.1's redis-stream listener dies (XREAD with no stream:
        # DataError) once the last subscriber of the last channel leaves, and
        # then delivers nothing: one idle subscription keeps a stream in its set.
        async with broadcast.subscribe(channel="bench-keepalive"):
            yield
    finally:
        await broadcast.disconnect()


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        topic = json.loads(await websocket.receive_text()).get("topic", "bench")
        async with AsyncExitStack() as stack:
            async with subscribe_lock:
                subscriber = await stack.enter_async_context(broadcast.subscribe(channel=topic))
            await websocket.send_text('{"type":"subscribed"}')

            async def watch() -> None:  # notice the client leaving
                try:
                    while True:
                        await websocket.receive_text()
                except WebSocketDisconnect:
                    pass
                forward.cancel()

            async def pump() -> None:
                async for event in subscriber:
                    await websocket.send_text(event.message)

            forward = asyncio.ensure_future(pump())
            watcher = asyncio.ensure_future(watch())
            try:
                await forward
            except asyncio.CancelledError:
                pass
            finally:
                watcher.cancel()
                forward.cancel()
    except (WebSocketDisconnect, RuntimeError):
        pass


async def send_event(topic: str, data: dict[str, Any]) -> None:
    frame = json.dumps({"type": "event", "topic": topic, "event": TOPIC_EVENT, "data": data}, separators=(",", ":"))
    await broadcast.publish(channel=topic, message=frame)


async def publish(request: Request) -> JSONResponse:
    topic, n, rate = query_params(request.query_params)

    async def one(i: int, data: dict[str, Any]) -> None:
        await send_event(topic, data)

    return JSONResponse(await drive(one, n, rate))


async def publish_topics(request: Request) -> JSONResponse:
    topics, n = topics_params(request.query_params)

    async def one(topic: str, i: int, data: dict[str, Any]) -> None:
        await send_event(topic, data)

    return JSONResponse(await drive_topics(one, topics, n))


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        WebSocketRoute("/ws", ws),
        Route("/publish", publish, methods=["POST"]),
        Route("/publish-topics", publish_topics, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan,
)
