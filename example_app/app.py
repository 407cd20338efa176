"""A user writes to an "agent"; the agent answers later on the user's own topic.

The scenario starlette_replay exists for: the answer is published while the
browser may be disconnected (a train tunnel, a laptop lid, a dropped socket),
and must still arrive, exactly once, when the page reconnects.

* ``GET /`` sets a ``uid`` cookie (the demo's idea of a login) and serves the page.
* ``GET /api/history`` is the page's snapshot: the topic's retained events and
  the cursor (epoch, head) they end at; the page subscribes from that cursor.
* ``POST /api/messages`` stores the user's message as an event, then starts the
  agent: a ``task_interaction`` "working" event, ``agent_log`` lines over
  ``agent_delay`` seconds, then the answer streamed token by token at
  ``token_rate`` tokens/s between a start marker (``answer_start``) and a final
  marker (``task_interaction`` "done", or "stopped", holding the whole text),
  all on ``user:<uid>``. Every token is an event: a page that drops its socket
  or reloads mid-answer resumes at the exact token.
* ``POST /api/stop`` stores a ``stop_requested`` event for a task; the agent
  reads its topic between tokens, sees it and ends the answer with "stopped".
  A dropped socket never stops the agent: nothing it does depends on a
  connection.
* ``/ws`` is the replay route; a socket may only subscribe to its own user's topic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from starlette_replay import EventStore, MemoryStore, RedisStore, Refused, Replay

__all__ = ["create_app", "plan_answer", "split_tokens"]

logger = logging.getLogger("example_app")

STATIC = Path(__file__).parent / "static"
COOKIE = "uid"
_UID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TEXT = 500
HISTORY_LIMIT = 1000  # events a page load shows at most


def user_id(conn: HTTPConnection) -> str | None:
    """The uid cookie when it is well formed, else None."""
    uid = conn.cookies.get(COOKIE)
    return uid if uid is not None and _UID_RE.fullmatch(uid) else None


def topic_of(uid: str) -> str:
    return f"user:{uid}"


RESTAURANTS = ["Eulji Myeonok", "Yangmi-ok", "Hwangseng-ga Kalguksu", "Mansuk Jang", "Gyodong Jjambbong"]


def plan_answer(text: str) -> tuple[list[str], str]:
    """What the agent logs and answers for a request like "Euljiro, 2 people, tomorrow at 12:30"."""
    place = text.split(",")[0].strip()[:40] or "Seoul"
    people = re.search(r"(\d+)\s*(?:people|persons|guests|pax|명)", text, re.IGNORECASE)
    party = int(people.group(1)) if people else 2
    when = re.search(r"\b(\d{1,2})[:.](\d{2})\b", text)
    hour = f"{int(when.group(1)):02d}:{when.group(2)}" if when else "19:00"
    day = "tomorrow" if "tomorrow" in text.lower() else "today"
    digest = hashlib.sha256(text.encode()).digest()
    restaurant = RESTAURANTS[digest[0] % len(RESTAURANTS)]
    confirmation = digest[1:4].hex().upper()
    logs = [
        f"parsed request: place={place!r} party={party} when={day} {hour}",
        f"searching restaurants near {place} with a table for {party}",
        f"{restaurant}: table for {party} free {day} at {hour}; holding it",
        f"reservation confirmed, code {confirmation}",
    ]
    answer = (
        f"Booked: a table for {party} at {restaurant} ({place}), {day} at {hour}. Confirmation {confirmation}. "
        "I asked for a quiet table away from the door; they hold it for fifteen minutes past the time, "
        "so call them if you are running late."
    )
    return logs, answer


_TOKEN_RE = re.compile(r"\s*\S+")


def split_tokens(text: str) -> list[str]:
    """The answer as the agent streams it: words with their leading space; they join back to ``text``."""
    return _TOKEN_RE.findall(text)


def make_store() -> EventStore:
    """A RedisStore when REDIS_URL is set (instances then share one history), else a MemoryStore."""
    url = os.environ.get("REDIS_URL")
    if url:
        store: EventStore = RedisStore.from_url(url)
        return store
    return MemoryStore()


def create_app(
    *,
    agent_delay: float = 3.0,
    store: EventStore | None = None,
    heartbeat_interval: float = 25.0,
    token_rate: float = 30.0,
) -> Starlette:
    """The demo app. ``agent_delay``: seconds of agent logs before the answer; ``token_rate``: tokens/s."""
    if not token_rate > 0:
        raise ValueError("token_rate must be > 0 tokens per second")

    def authorize(conn: HTTPConnection, topic: str) -> bool:  # a WebSocket, or the SSE route's Request
        uid = user_id(conn)
        return uid is not None and topic == topic_of(uid)

    def identify(conn: HTTPConnection) -> str:
        uid = user_id(conn)
        if uid is None:
            raise Refused("no uid cookie")
        return uid

    replay = Replay(
        store if store is not None else make_store(),
        authorize=authorize,
        identify=identify,
        heartbeat_interval=heartbeat_interval,
    )
    task_group: TaskGroup | None = None
    # Client ids of messages already handed to the agent (a retried POST is stored
    # once thanks to the idempotency key, and must not wake the agent twice).
    started: OrderedDict[str, None] = OrderedDict()

    async def stop_seen(topic: str, task_id: str, after: int) -> tuple[bool, int]:
        """Whether a ``stop_requested`` for ``task_id`` was stored after offset ``after``; and how far it read.

        The stop is a message on the topic, read from the store: it reaches the
        agent whichever instance took the POST, and only the Stop button sends it.
        """
        while True:
            events = await replay.history(topic, after=after, limit=1000)
            if events:
                after = events[-1].offset
            if any(e.event == "stop_requested" and e.data.get("task_id") == task_id for e in events):
                return True, after
            if len(events) < 1000:  # read up to the head: one read per token, as a rule
                return False, after

    async def agent(topic: str, task_id: str, text: str) -> None:
        logs, answer = plan_answer(text)
        try:
            working = await replay.publish(
                topic, "task_interaction", {"task_id": task_id, "state": "working", "text": text}
            )
            step = agent_delay / (len(logs) + 1)
            for line in logs:
                await anyio.sleep(step)
                await replay.publish(topic, "agent_log", {"task_id": task_id, "line": line})
            await anyio.sleep(step)
            await replay.publish(topic, "answer_start", {"task_id": task_id})
            said: list[str] = []
            checked = working.offset  # a Stop pressed before the start marker counts too
            state = "done"
            for token in split_tokens(answer):
                stopped, checked = await stop_seen(topic, task_id, checked)
                if stopped:
                    state = "stopped"
                    break
                await replay.publish(topic, "answer_delta", {"task_id": task_id, "seq": len(said), "text": token})
                said.append(token)
                await anyio.sleep(1 / token_rate)
            # The final marker holds the whole text: a late joiner (or a history view)
            # can show it without the tokens, and a page checks its tokens against it.
            await replay.publish(
                topic,
                "task_interaction",
                {"task_id": task_id, "state": state, "text": "".join(said), "tokens": len(said)},
            )
        except Exception:
            logger.exception("agent failed on %s", topic)

    async def index(request: Request) -> Response:
        response = FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})
        if user_id(request) is None:
            response.set_cookie(COOKIE, secrets.token_urlsafe(12), max_age=30 * 86400, httponly=True, samesite="lax")
        return response

    async def history(request: Request) -> Response:
        uid = user_id(request)
        if uid is None:
            return JSONResponse({"error": "no uid cookie: load / first"}, status_code=401)
        topic = topic_of(uid)
        snap = await replay.snapshot(topic, limit=HISTORY_LIMIT)
        events = [
            {"offset": e.offset, "event": e.event, "data": e.data, "time": e.time, "epoch": e.epoch}
            for e in snap.events
        ]
        return JSONResponse(
            {
                "topic": topic,
                "cursor": {"epoch": snap.epoch, "offset": snap.head},
                "events": events,
                "agent_delay": agent_delay,
                "token_rate": token_rate,
                "heartbeat_interval": heartbeat_interval,
            }
        )

    async def user_and_body(request: Request) -> tuple[str, dict[str, Any]] | JSONResponse:
        """The caller's uid and its JSON object body, or the refusal to answer with."""
        uid = user_id(request)
        if uid is None:
            return JSONResponse({"error": "no uid cookie: load / first"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        return uid, body if isinstance(body, dict) else {}

    async def post_message(request: Request) -> Response:
        got = await user_and_body(request)
        if isinstance(got, JSONResponse):
            return got
        uid, body = got
        text = body.get("text")
        client_id = body.get("client_id")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            return JSONResponse({"error": f"text must be 1-{MAX_TEXT} characters"}, status_code=400)
        if not isinstance(client_id, str) or _CLIENT_ID_RE.fullmatch(client_id) is None:
            return JSONResponse({"error": "client_id must be 1-64 characters of A-Z a-z 0-9 _ -"}, status_code=400)
        topic = topic_of(uid)
        text = text.strip()
        event = await replay.publish(
            topic, "user_message", {"text": text, "client_id": client_id}, idempotency_key=client_id
        )
        if client_id not in started and task_group is not None:
            started[client_id] = None
            if len(started) > 10_000:
                started.popitem(last=False)
            task_group.start_soon(agent, topic, client_id, text)
        return JSONResponse({"offset": event.offset, "epoch": event.epoch}, status_code=202)

    async def stop(request: Request) -> Response:
        got = await user_and_body(request)
        if isinstance(got, JSONResponse):
            return got
        uid, body = got
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or _CLIENT_ID_RE.fullmatch(task_id) is None:
            return JSONResponse({"error": "task_id must be 1-64 characters of A-Z a-z 0-9 _ -"}, status_code=400)
        event = await replay.publish(
            topic_of(uid), "stop_requested", {"task_id": task_id}, idempotency_key=f"stop-{task_id}"
        )
        return JSONResponse({"offset": event.offset, "epoch": event.epoch}, status_code=202)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal task_group
        async with replay, anyio.create_task_group() as tg:
            task_group = tg
            try:
                yield
            finally:
                task_group = None
                tg.cancel_scope.cancel()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/history", history),
            Route("/api/messages", post_message, methods=["POST"]),
            Route("/api/stop", stop, methods=["POST"]),
            replay.client_route("/replay.js"),
            replay.route("/ws"),
            replay.sse_route("/sse"),  # the same stream over server-sent events (the page's ?transport=sse)
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.replay = replay
    return app
