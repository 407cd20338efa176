"""Contender "bare": a hand-written Starlette broadcast with no store.

Each event is JSON-encoded once and sent to every subscribed socket in turn.
A client sends any text frame to subscribe (the lean client sends the same
``subscribe`` frame as to the library) and gets ``{"type":"subscribed"}`` back.
"""

from __future__ import annotations

import json
from typing import Any

from _common import TOPIC_EVENT, drive, drive_topics, query_params, topics_params
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

clients: dict[str, set[WebSocket]] = {}


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    joined: list[str] = []
    try:
        while True:
            text = await websocket.receive_text()
            topic = json.loads(text).get("topic", "bench")
            clients.setdefault(topic, set()).add(websocket)
            joined.append(topic)
            await websocket.send_text('{"type":"subscribed"}')
    except WebSocketDisconnect:
        pass
    finally:
        for topic in joined:
            clients.get(topic, set()).discard(websocket)


async def send_event(topic: str, data: dict[str, Any]) -> None:
    frame = json.dumps({"type": "event", "topic": topic, "event": TOPIC_EVENT, "data": data}, separators=(",", ":"))
    for socket in list(clients.get(topic, ())):
        try:
            await socket.send_text(frame)
        except Exception:
            clients.get(topic, set()).discard(socket)


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
    ]
)
