"""ReplayEventStore in-process: event ids, the session scope, and resumes the store cannot vouch for."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from mcp.server.streamable_http import EventMessage
from mcp.types import JSONRPCNotification, JSONRPCResponse
from starlette.types import Message, Receive, Scope, Send

import starlette_replay.mcp
from starlette_replay import MemoryStore, Replay
from starlette_replay.mcp import ReplayEventStore

pytestmark = pytest.mark.anyio

SESSION = "5a0e3b5067ef4d2e919faf8a3a523c18"


def progress(step: int) -> JSONRPCNotification:
    return JSONRPCNotification(
        jsonrpc="2.0", method="notifications/progress", params={"progressToken": "p", "progress": step}
    )


async def in_session(event_store: ReplayEventStore, session: str, work: Any) -> None:
    """Run ``work()`` as the SDK's calls run: inside a request of ``session`` served through ``wrap``."""

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await work()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": [(b"mcp-session-id", session.encode())]}
    await event_store.wrap(inner)(scope, receive, send)


async def store_in_session(event_store: ReplayEventStore, items: list[Any], session: str = SESSION) -> list[str]:
    """``store_event`` for each (stream id, message), in a request of ``session``; the event ids."""
    ids: list[str] = []

    async def work() -> None:
        for stream_id, message in items:
            ids.append(await event_store.store_event(stream_id, message))

    await in_session(event_store, session, work)
    return ids


async def replayed(event_store: ReplayEventStore, last_event_id: str, session: str = SESSION) -> list[EventMessage]:
    """What ``replay_events_after`` sends, called (as the SDK does) in a request of ``session``."""
    sent: list[EventMessage] = []

    async def callback(message: EventMessage) -> None:
        sent.append(message)

    async def work() -> None:
        assert await event_store.replay_events_after(last_event_id, callback) is None

    with anyio.fail_after(5):
        await in_session(event_store, session, work)
    return sent


async def test_events_of_a_stream_replay_after_an_id_until_the_response() -> None:
    async with Replay(MemoryStore()) as replay:
        event_store = ReplayEventStore(replay)
        response = JSONRPCResponse(jsonrpc="2.0", id=7, result={"ok": True})
        items = [("7", None), ("7", progress(1)), ("7", progress(2)), ("7", response)]
        ids = await store_in_session(event_store, items)
        assert len(set(ids)) == 4 and all(i.startswith(f"mcp:{SESSION}:7:") for i in ids)
        sent = await replayed(event_store, ids[0])  # from the priming marker: every message
        assert [m.message for m in sent] == [progress(1), progress(2), response]
        assert [m.event_id for m in sent] == ids[1:]
        assert await replayed(event_store, ids[3]) == [], "after the response the stream is complete"
        assert await replayed(event_store, "not-ours:1:2:3") == []
        assert await replayed(event_store, f"mcp:{SESSION}:7:e:x:1") == []
        assert await replayed(event_store, ids[0], session="another") == [], "another session's stream"
        with pytest.raises(RuntimeError, match=r"event_store\.wrap"):
            await event_store.store_event("7", progress(3))  # outside a request served through wrap


async def test_a_resume_the_store_cannot_vouch_for_sends_what_it_holds_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Replay(MemoryStore()) as replay:
        event_store = ReplayEventStore(replay)
        response = JSONRPCResponse(jsonrpc="2.0", id=1, result={})
        ids = await store_in_session(event_store, [("1", None), ("1", progress(1)), ("1", response)])
        topic, epoch, offset, time = ids[1].rsplit(":", 3)
        with caplog.at_level(logging.WARNING, logger="starlette_replay.mcp"):
            reused = await replayed(event_store, f"{topic}:{epoch}:{offset}:{int(time) + 1}")
            other_epoch = await replayed(event_store, f"{topic}:0123456789abcdef:{offset}:{time}")
        assert [m.message for m in reused] == [progress(1), response]
        assert [m.message for m in other_epoch] == [progress(1), response]
        assert [r.getMessage().split(": ")[1] for r in caplog.records] == [
            "the offset was reused for another event (the store lost events); sending all it still holds",
            "the store no longer holds the history after it; sending all it still holds",
        ]


async def test_the_same_request_id_in_two_sessions_is_two_streams() -> None:
    async with Replay(MemoryStore()) as replay:
        event_store = ReplayEventStore(replay)
        (a,) = await store_in_session(event_store, [("1", progress(1))], session="a" * 32)
        (b,) = await store_in_session(event_store, [("1", progress(2))], session="b" * 32)
        assert a.rsplit(":", 3)[0] != b.rsplit(":", 3)[0]
        # a request id or session id outside the topic alphabet gets a digest, never a shared topic
        (odd,) = await store_in_session(event_store, [("id with spaces/ü", progress(3))], session="x y")
        assert odd.startswith("mcp:h.") and ":h." in odd.rsplit(":", 3)[0]


async def test_store_event_outside_wrap_is_refused() -> None:
    async with Replay(MemoryStore()) as replay:
        event_store = ReplayEventStore(replay)
        with pytest.raises(RuntimeError, match=r"event_store\.wrap"):
            await event_store.store_event("1", progress(1))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="topic"):
        ReplayEventStore(Replay(), prefix="has space")
    with pytest.raises(ValueError, match="64 characters"):
        ReplayEventStore(Replay(), prefix="p" * 65)
    with pytest.raises(ValueError, match="poll_interval"):
        ReplayEventStore(Replay(), poll_interval=2, max_poll_interval=1)
    assert "prefix='mcp'" in repr(ReplayEventStore(Replay()))
    assert starlette_replay.mcp.__all__ == ["ReplayEventStore"]


async def test_a_get_without_the_session_header_goes_to_the_app() -> None:
    """Other SSE routes of the app keep their Last-Event-ID: only an MCP resume (with its session) is taken."""
    async with Replay(MemoryStore()) as replay:
        event_store = ReplayEventStore(replay)
        (event_id,) = await store_in_session(event_store, [("1", progress(1))])
        reached: list[str] = []

        async def inner(scope: Scope, receive: Receive, send: Send) -> None:
            reached.append(scope["path"])

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            pass

        headers = [(b"last-event-id", event_id.encode())]
        scope = {"type": "http", "method": "GET", "path": "/sse", "headers": headers}
        await event_store.wrap(inner)(scope, receive, send)
        assert reached == ["/sse"]
