"""The SSE route in process: every refusal before any stream byte, the cursor-list grammar, the stream's
framing (retry line, subscribed, events, ids), heartbeats as comments, and streams ended when the promise
cannot be kept (slow consumer, revoke, shutdown, lost store)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from starlette_replay import MemoryStore, Refused, Replay, StoreUnavailable, allow_all
from starlette_replay.protocol import MAX_OFFSET, FrameError, parse_cursor_list, parse_stream_request

from .helpers import running
from .sse_client import AsgiStream, query

EMPTY = {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}

pytestmark = pytest.mark.anyio

EPOCH = "9f1c2a7be04d3a65"


def make_sse_app(replay: Replay) -> Starlette:
    return Starlette(routes=[replay.route("/ws"), replay.sse_route("/sse")], lifespan=replay.lifespan)


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Replay, Any]]:
    options: dict[str, Any] = {"authorize": allow_all}
    marker = request.node.get_closest_marker("replay")
    if marker is not None:
        options.update(marker.kwargs)
    store = options.pop("store", None) or MemoryStore()
    replay = Replay(store, **options)
    async with running(make_sse_app(replay)) as app:
        yield replay, app


async def refused(app: Any, query_string: str, headers: dict[str, str] | None = None) -> AsgiStream:
    """Open a request that must be refused; returns it ended (status, JSON body)."""
    async with AsgiStream(app, "/sse", query_string, headers) as stream:
        await stream.ended_within()
    assert stream.ended
    assert stream.response_headers["content-type"] == "application/json"
    body = stream.json()
    assert set(body) == {"type", "code", "message"}, body
    assert body["type"] == "error"
    return stream


# --- the grammar, pure -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "count", "expected"),
    [
        (f"{EPOCH}:17:1764164944123,", 2, [(EPOCH, 17, 1764164944123), None]),
        (f"{EPOCH}:0", 1, [(EPOCH, 0, None)]),
        ("", 1, [None]),
        (",", 2, [None, None]),
        (f",e:{MAX_OFFSET}", 2, [None, ("e", MAX_OFFSET, None)]),
        ("x" * 64 + ":1:2", 1, [("x" * 64, 1, 2)]),
    ],
)
def test_cursor_list_parses(value: str, count: int, expected: list[Any]) -> None:
    assert parse_cursor_list(value, count) == expected


@pytest.mark.parametrize(
    ("value", "count", "needle"),
    [
        ("nonsense", 1, "entry 1"),  # neither empty nor epoch:offset[:time]
        (f"{EPOCH}", 1, "entry 1"),
        (f"{EPOCH}:", 1, "entry 1"),
        (f"{EPOCH}:1:2:3", 1, "entry 1"),  # an epoch with ':' reads as too many parts
        (f"{EPOCH}:1", 2, "1 entries for 2 topics"),
        (f"{EPOCH}:1,,", 2, "3 entries for 2 topics"),
        (f"{EPOCH}:-1", 1, "entry 1"),  # negative offset
        (f"{EPOCH}:1.5", 1, "entry 1"),  # not an integer
        (f"{EPOCH}:abc", 1, "entry 1"),
        (f"{EPOCH}:01", 1, "entry 1"),  # not an integer as JSON writes it
        (f"{EPOCH}:1:x", 1, "entry 1"),
        (f"{EPOCH}:{MAX_OFFSET + 1}", 1, "at most"),
        ("x" * 65 + ":1", 1, "entry 1"),  # an epoch over 64 characters
        (":1", 1, "entry 1"),  # an empty epoch
        (f"{EPOCH} :1", 1, "entry 1"),
        ("e:1," * 2500, 2501, "at most 8192 characters"),  # 10,000 characters
    ],
)
def test_cursor_list_refuses(value: str, count: int, needle: str) -> None:
    with pytest.raises(FrameError) as refused:
        parse_cursor_list(value, count)
    assert refused.value.code == "bad_request"
    assert needle in refused.value.message


def test_stream_request_makes_one_subscribe_per_topic() -> None:
    parsed = parse_stream_request(["a", "b", "c"], ["5"], f"{EPOCH}:3:99,,{EPOCH}:4", max_subscriptions=3)
    assert [(s.topic, s.epoch, s.offset, s.time, s.rewind) for s in parsed.subscribes] == [
        ("a", EPOCH, 3, 99, 5),
        ("b", None, None, None, 5),
        ("c", EPOCH, 4, None, 5),
    ]


# --- refusals over ASGI: a status, a JSON body, nothing else ----------------------------


@pytest.mark.parametrize(
    ("query_string", "headers", "code", "needle"),
    [
        ("", {}, "bad_request", "no topic"),
        ("rewind=3", {}, "bad_request", "no topic"),
        (query(["bad topic"]), {}, "bad_request", "must be 1-256 characters"),
        (query(["a" * 257]), {}, "bad_request", "must be 1-256 characters"),
        (query(["a", "b", "a"]), {}, "bad_request", "more than once"),
        (query(["a"], rewind=-1), {}, "bad_request", "rewind"),
        (query(["a"], rewind="x"), {}, "bad_request", "rewind"),
        (query(["a"], rewind=1.5), {}, "bad_request", "rewind"),
        (query(["a"]) + "&rewind=1&rewind=2", {}, "bad_request", "more than once"),
        (query(["a"]), {"last-event-id": "nonsense"}, "bad_request", "entry 1"),
        (query(["a", "b"]), {"last-event-id": f"{EPOCH}:1"}, "bad_request", "1 entries for 2 topics"),
        (query(["a"]), {"last-event-id": f"{EPOCH}:-3"}, "bad_request", "entry 1"),
        (query(["a"]), {"last-event-id": f"{EPOCH}:x"}, "bad_request", "entry 1"),
        (query(["a"]), {"last-event-id": "ep:och:1"}, "bad_request", "entry 1"),
        (query(["a"]), {"last-event-id": "x" * 65 + ":1"}, "bad_request", "entry 1"),
        (query(["a"]), {"last-event-id": "x" * 10_000}, "bad_request", "at most 8192"),
        (query(["a"], last_event_id=f"{EPOCH}:1,"), {}, "bad_request", "2 entries for 1 topics"),
        (query([f"t{i}" for i in range(4)]), {}, "too_many_subscriptions", "at most 3"),
    ],
)
@pytest.mark.replay(max_subscriptions=3)
async def test_bad_input_is_a_400_and_nothing_else(
    served: tuple[Replay, Any], query_string: str, headers: dict[str, str], code: str, needle: str
) -> None:
    replay, app = served
    stream = await refused(app, query_string, headers)
    assert stream.status == 400
    assert stream.json()["code"] == code
    assert needle in stream.json()["message"], stream.json()
    assert replay.stats() == EMPTY


async def test_more_topics_than_a_cursor_list_can_hold_are_refused_before_the_stream() -> None:
    # 16-character epochs: an entry is at most 16 + 1 + 16 + 1 + 16 characters, so 160 fit in 8,192 with their commas.
    replay = Replay(authorize=allow_all, max_subscriptions=500)
    async with running(make_sse_app(replay)) as app:
        async with AsgiStream(app, "/sse", query([f"t{i}" for i in range(160)])) as stream:
            assert stream.status == 200
        stream = await refused(app, query([f"t{i}" for i in range(161)]))
        assert (stream.status, stream.json()["code"]) == (400, "too_many_subscriptions")
        assert "cursor list" in stream.json()["message"]
        assert replay.stats()["subscriptions"] == 0


async def test_an_empty_entry_is_a_topic_without_a_cursor(served: tuple[Replay, Any]) -> None:
    replay, app = served
    first = await replay.publish("a", "tick", {"n": 1})
    async with AsgiStream(app, "/sse", query(["a", "b"]), {"last-event-id": f"{first.epoch}:0,"}) as stream:
        assert stream.status == 200
        frame, _ = await stream.frame()
        assert (frame["topic"], frame["resumed"], frame["recovered"], frame["replayed"]) == ("a", True, True, 1)
        frame, _ = await stream.frame()
        assert (frame["type"], frame["offset"]) == ("event", 1)
        frame, _ = await stream.frame()
        assert (frame["topic"], frame["resumed"], frame["recovered"]) == ("b", False, False)


async def test_a_foreign_origin_is_a_403(served: tuple[Replay, Any]) -> None:
    _, app = served
    stream = await refused(app, query(["a"]), {"origin": "https://evil.example"})
    assert (stream.status, stream.json()["code"]) == (403, "forbidden")


async def test_the_same_origin_is_served(served: tuple[Replay, Any]) -> None:
    _, app = served
    async with AsgiStream(app, "/sse", query(["a"]), {"origin": "http://testserver"}) as stream:
        assert stream.status == 200


async def test_head_is_a_405(served: tuple[Replay, Any]) -> None:
    _, app = served
    async with AsgiStream(app, "/sse", query(["a"]), method="HEAD") as stream:
        await stream.ended_within()
    assert (stream.status, stream.response_headers["allow"]) == (405, "GET")


async def test_an_allowed_page_of_another_origin_gets_cors_headers() -> None:
    replay = Replay(authorize=allow_all, allowed_origins=["https://app.example"])
    async with running(make_sse_app(replay)) as app:
        async with AsgiStream(app, "/sse", query(["a"]), {"origin": "https://app.example"}) as stream:
            assert stream.status == 200
            assert stream.response_headers["access-control-allow-origin"] == "https://app.example"
            assert stream.response_headers["access-control-allow-credentials"] == "true"
            assert stream.response_headers["vary"] == "origin"
        # a refusal's body is readable by that page too
        bad = await refused(app, query(["a", "a"]), {"origin": "https://app.example"})
        assert bad.response_headers["access-control-allow-origin"] == "https://app.example"
        # and nothing for an origin the rule refuses
        evil = await refused(app, query(["a"]), {"origin": "https://evil.example"})
        assert evil.status == 403
        assert "access-control-allow-origin" not in evil.response_headers


async def test_identify_refusing_is_a_403_and_its_identity_is_used(served: tuple[Replay, Any]) -> None:
    seen: list[HTTPConnection] = []

    def identify(conn: HTTPConnection) -> str | None:
        seen.append(conn)
        if conn.query_params.get("token") == "bad":
            raise Refused("bad token")
        return conn.query_params.get("token")

    replay = Replay(authorize=allow_all, identify=identify)
    async with running(make_sse_app(replay)) as app:
        stream = await refused(app, query(["a"], token="bad"))
        assert (stream.status, stream.json()["code"]) == (403, "forbidden")
        async with AsgiStream(app, "/sse", query(["a"], token="alice")) as stream:
            assert stream.status == 200
            await stream.frame()
            (connection,) = replay._registry.connections
            assert connection.identity == "alice"
    assert type(seen[0]).__name__ == "Request"


async def test_a_stored_cursor_is_resumed_for_a_topic_without_an_entry(served: tuple[Replay, Any]) -> None:
    from starlette_replay import Cursor

    def identify(conn: HTTPConnection) -> str:
        return "alice"

    store = MemoryStore()
    replay = Replay(store, authorize=allow_all, identify=identify)
    async with running(make_sse_app(replay)) as app:
        events = [await replay.publish("a", "tick", {"n": n}) for n in range(3)]
        await store.save_cursor("alice", "a", Cursor(events[0].epoch, 1, events[0].time))
        async with AsgiStream(app, "/sse", query(["a"])) as stream:
            frame, event_id = await stream.frame()
            assert (frame["resumed"], frame["recovered"], frame["replayed"]) == (True, True, 2)
            assert event_id == f"{events[0].epoch}:1:{events[0].time}"  # the stored cursor's time too
            assert [(await stream.frame())[0]["offset"] for _ in range(2)] == [2, 3]


async def test_authorize_refusing_a_topic_is_a_403_naming_it() -> None:
    async def authorize(conn: HTTPConnection, topic: str) -> bool:
        return not topic.startswith("secret")

    replay = Replay(authorize=authorize)
    async with running(make_sse_app(replay)) as app:
        stream = await refused(app, query(["news", "secret:1"]))
        assert (stream.status, stream.json()["code"]) == (403, "forbidden")
        assert "'secret:1'" in stream.json()["message"]
        assert replay.stats()["subscriptions"] == 0


async def test_no_authorize_hook_is_a_403_that_says_how() -> None:
    replay = Replay()
    async with running(make_sse_app(replay)) as app:
        stream = await refused(app, query(["news"]))
        assert (stream.status, stream.json()["code"]) == (403, "forbidden")
        assert "authorize=" in stream.json()["message"]


async def test_authorize_raising_is_a_500() -> None:
    def authorize(conn: HTTPConnection, topic: str) -> bool:
        raise RuntimeError("boom")

    replay = Replay(authorize=authorize)
    async with running(make_sse_app(replay)) as app:
        stream = await refused(app, query(["news"]))
        assert (stream.status, stream.json()["code"]) == (500, "internal")


async def test_not_running_is_a_503() -> None:
    replay = Replay(authorize=allow_all)
    stream = await refused(make_sse_app(replay), query(["news"]))
    assert (stream.status, stream.json()["code"]) == (503, "unavailable")


class _DownStore(MemoryStore):
    """A memory store whose position() fails while ``down``."""

    down = False

    async def position(self, topic: str) -> Any:
        if self.down:
            raise StoreUnavailable("down for the test")
        return await super().position(topic)


async def test_an_unreachable_store_is_a_503_with_nothing_held() -> None:
    store = _DownStore()
    replay = Replay(store, authorize=allow_all)
    async with running(make_sse_app(replay)) as app:
        store.down = True
        stream = await refused(app, query(["a", "b"]))
        assert (stream.status, stream.json()["code"]) == (503, "unavailable")
        assert replay.stats() == EMPTY


# --- the stream -------------------------------------------------------------------


@pytest.mark.replay(sse_retry=1500)
async def test_the_stream_opens_with_retry_then_subscribed_then_events(served: tuple[Replay, Any]) -> None:
    replay, app = served
    async with AsgiStream(app, "/sse", query(["a", "b"])) as stream:
        assert stream.status == 200
        assert stream.response_headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.response_headers["cache-control"] == "no-cache"
        assert stream.response_headers["x-accel-buffering"] == "no"
        first = await stream.next()
        assert (first.retry, first.data) == (1500, None)
        assert stream.chunks[0] == b"retry: 1500\n\n"
        sub_a, id_a = await stream.frame()
        sub_b, id_b = await stream.frame()
        assert (sub_a["type"], sub_a["topic"], sub_b["topic"]) == ("subscribed", "a", "b")
        epoch_a, epoch_b = sub_a["epoch"], sub_b["epoch"]
        assert id_a == f"{epoch_a}:0,"
        assert id_b == f"{epoch_a}:0,{epoch_b}:0"
        event = await replay.publish("b", "tick", {"n": 1})
        frame, event_id = await stream.frame()
        expected = {"type": "event", "topic": "b", "offset": 1, "event": "tick", "data": {"n": 1}, "time": event.time}
        assert frame == expected
        assert event_id == f"{epoch_a}:0,{epoch_b}:1:{event.time}"
        # exactly the JSON the WebSocket route sends, on one data: line with one id: line
        assert stream.body.endswith(f"id: {event_id}\ndata: {json.dumps(frame, separators=(',', ':'))}\n\n".encode())


async def test_resume_with_last_event_id_replays_what_was_missed(served: tuple[Replay, Any]) -> None:
    replay, app = served
    events = [await replay.publish("a", "tick", {"n": n}) for n in range(5)]
    epoch = events[0].epoch
    async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{epoch}:2:{events[1].time}"}) as stream:
        sub, sub_id = await stream.frame()
        assert (sub["offset"], sub["resumed"], sub["recovered"], sub["replayed"]) == (5, True, True, 3)
        # the position just before the first event that follows, with the time the client sent
        assert sub_id == f"{epoch}:2:{events[1].time}"
        got = [await stream.frame() for _ in range(3)]
        assert [f["offset"] for f, _ in got] == [3, 4, 5]
        assert [i for _, i in got] == [f"{epoch}:{e.offset}:{e.time}" for e in events[2:]]


async def test_the_last_event_id_header_wins_over_the_parameter(served: tuple[Replay, Any]) -> None:
    replay, app = served
    events = [await replay.publish("a", "tick", {"n": n}) for n in range(3)]
    epoch = events[0].epoch
    target = query(["a"], last_event_id=f"{epoch}:0")
    async with AsgiStream(app, "/sse", target, {"last-event-id": f"{epoch}:2"}) as stream:
        sub, _ = await stream.frame()
        assert sub["replayed"] == 1
    async with AsgiStream(app, "/sse", target) as stream:
        sub, _ = await stream.frame()
        assert sub["replayed"] == 3


async def test_another_epoch_is_not_recovered_and_replays_what_is_retained(served: tuple[Replay, Any]) -> None:
    replay, app = served
    for n in range(2):
        await replay.publish("a", "tick", {"n": n})
    async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": "0000000000000000:7"}) as stream:
        sub, sub_id = await stream.frame()
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 2)
        assert sub_id == f"{sub['epoch']}:0"


async def test_rewind_replays_the_last_events_of_a_topic_without_cursor(served: tuple[Replay, Any]) -> None:
    replay, app = served
    for n in range(5):
        await replay.publish("a", "tick", {"n": n})
    async with AsgiStream(app, "/sse", query(["a"], rewind=2)) as stream:
        sub, sub_id = await stream.frame()
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (False, False, 2)
        assert sub_id == f"{sub['epoch']}:3"
        assert [(await stream.frame())[0]["offset"] for _ in range(2)] == [4, 5]


async def test_a_topic_keeps_the_entry_the_client_sent_until_its_subscribed(served: tuple[Replay, Any]) -> None:
    replay, app = served
    a = await replay.publish("a", "tick", {})
    b = await replay.publish("b", "tick", {})
    sent = f"{a.epoch}:0,{b.epoch}:1:{b.time}"
    async with AsgiStream(app, "/sse", query(["a", "b"]), {"last-event-id": sent}) as stream:
        sub_a, id_1 = await stream.frame()
        assert sub_a["type"] == "subscribed"
        assert id_1 == f"{a.epoch}:0,{b.epoch}:1:{b.time}"  # b untouched: its subscribed is not there yet
        event_a, id_2 = await stream.frame()
        assert event_a["offset"] == 1
        assert id_2 == f"{a.epoch}:1:{a.time},{b.epoch}:1:{b.time}"
        sub_b, id_3 = await stream.frame()
        assert (sub_b["topic"], sub_b["replayed"]) == ("b", 0)
        assert id_3 == id_2


@pytest.mark.replay(heartbeat_interval=0.05)
async def test_heartbeat_is_a_comment(served: tuple[Replay, Any]) -> None:
    _, app = served
    async with AsgiStream(app, "/sse", query(["a"])) as stream:
        await stream.frame()
        ping = await stream.next(comments=True)
        assert ping.comment == "ping"
        assert stream.body.endswith(b"\n\n: ping\n\n")


async def test_client_gone_leaves_nothing_behind(served: tuple[Replay, Any]) -> None:
    replay, app = served
    async with AsgiStream(app, "/sse", query(["a", "b"])) as stream:
        await stream.frame()
        await stream.frame()
        assert replay.stats()["connections"] == 1
        assert replay.stats()["subscriptions"] == 2
    assert replay.stats() == EMPTY
    assert not stream.ended  # the client left: nothing more was written


@pytest.mark.replay(send_queue_size=10)
async def test_a_slow_consumer_is_ended(served: tuple[Replay, Any]) -> None:
    replay, app = served
    blocked = anyio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        async def stuck_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and b"event" in message.get("body", b""):
                await blocked.wait()  # a socket that takes nothing more
            await send(message)

        await app(scope, receive, stuck_send)

    async with AsgiStream(slow, "/sse", query(["a"])) as stream:
        await stream.frame()
        with anyio.fail_after(5):
            for n in range(30):
                await replay.publish("a", "tick", {"n": n})  # never waits for the stuck client
        (connection,) = replay._registry.connections
        assert connection.close_code == 1013
        blocked.set()
        await stream.ended_within()
    assert stream.ended
    assert replay.stats()["connections"] == 0


async def test_revoke_ends_the_stream(served: tuple[Replay, Any]) -> None:
    replay = Replay(authorize=allow_all, identify=lambda conn: "alice")
    async with running(make_sse_app(replay)) as app, AsgiStream(app, "/sse", query(["a"])) as stream:
        await stream.frame()
        with anyio.fail_after(5):
            assert await replay.revoke("alice") == 1
        await stream.ended_within()
        assert stream.ended


async def test_shutdown_ends_the_stream() -> None:
    replay = Replay(authorize=allow_all)
    async with running(make_sse_app(replay)) as app:
        stream = AsgiStream(app, "/sse", query(["a"]))
        await stream.__aenter__()
        await stream.frame()
    await stream.ended_within()
    assert stream.ended
    await stream.__aexit__(None, None, None)


async def test_a_store_lost_during_the_replay_ends_the_stream() -> None:
    class FailingReads(MemoryStore):
        fail = False

        async def read(self, topic: str, after: int, limit: int) -> Any:
            if self.fail:
                raise StoreUnavailable("reads fail for the test")
            return await super().read(topic, after, limit)

    store = FailingReads()
    replay = Replay(store, authorize=allow_all)
    async with running(make_sse_app(replay)) as app:
        events = [await replay.publish("a", "tick", {}) for _ in range(3)]
        store.fail = True
        async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{events[0].epoch}:0"}) as stream:
            assert stream.status == 200
            rest = await stream.ended_within()
            assert [m.data for m in rest if m.data is not None] == []  # no subscribed it could not honour
            assert stream.ended


async def test_a_stream_and_a_websocket_share_the_hub(served: tuple[Replay, Any]) -> None:
    from .helpers import connect

    replay, app = served
    async with connect(app) as ws, AsgiStream(app, "/sse", query(["a"])) as stream:
        await ws.send({"type": "subscribe", "topic": "a"})
        assert (await ws.recv())["type"] == "subscribed"
        await stream.frame()
        assert replay.stats()["topics"] == 1
        assert replay.stats()["subscriptions"] == 2
        await replay.publish("a", "tick", {"n": 1})
        from_ws = await ws.recv()
        from_sse, _ = await stream.frame()
        assert from_ws == from_sse


class _RacingStore(MemoryStore):
    """Publishes while a stream joins: one event between the live registration and the head read
    (live and replayed: the hand-off must drop one copy), one while the first page is read (live only)."""

    racing = False

    async def position(self, topic: str) -> Any:
        if self.racing:
            await self.append(topic, [("tick", '{"during":"position"}')])
        return await super().position(topic)

    async def read(self, topic: str, after: int, limit: int) -> Any:
        if self.racing:
            await self.append(topic, [("tick", '{"during":"read"}')])
        return await super().read(topic, after, limit)


async def test_events_published_during_the_join_come_once_each_in_order() -> None:
    store = _RacingStore()
    replay = Replay(store, authorize=allow_all)
    async with running(make_sse_app(replay)) as app:
        events = [await replay.publish("a", "tick", {"n": n}) for n in range(3)]
        store.racing = True
        async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{events[0].epoch}:1"}) as stream:
            sub, _ = await stream.frame()
            # the head includes the event published during position(): replayed 2, 3 and 4
            assert (sub["offset"], sub["replayed"], sub["recovered"]) == (4, 3, True)
            store.racing = False
            got = [await stream.frame() for _ in range(4)]
            assert [f["offset"] for f, _ in got] == [2, 3, 4, 5]
            assert [f["data"] for f, _ in got][2:] == [{"during": "position"}, {"during": "read"}]
            await replay.publish("a", "tick", {"n": "after"})
            frame, event_id = await stream.frame()
            assert frame["offset"] == 6
            assert event_id == f"{events[0].epoch}:6:{frame['time']}"


class _HttpSendTimeout:
    """Bounds every HTTP send with asyncio.timeout, as apps do to shed stuck clients: it cancels the
    task that entered it, so a send stepped inside the publisher's task would cancel the publisher."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        async def send_within(message: Any) -> None:
            async with asyncio.timeout(self.timeout):
                await send(message)

        await self.app(scope, receive, send_within if scope["type"] == "http" else send)


async def test_a_stuck_stream_under_a_send_timeout_middleware_never_reaches_the_publisher() -> None:
    from starlette.middleware import Middleware

    replay = Replay(authorize=allow_all)
    app = Starlette(
        routes=[replay.sse_route("/sse")],
        middleware=[Middleware(_HttpSendTimeout, timeout=0.1)],
        lifespan=replay.lifespan,
    )
    events = 300
    async with running(app) as app_, AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(AsgiStream(app_, "/sse", query(["t"]))) for _ in range(3)]
        for stream in streams:
            await stream.frame()
        a, b, stuck = streams
        stuck.stuck = True
        stack.callback(stuck.unstuck.set)  # unwound first: the stuck transport lets go
        with anyio.fail_after(20):
            for i in range(events):  # about one a millisecond, in this task: it must never be cancelled
                await replay.publish("t", "x", {"i": i})
                await anyio.sleep(0.001)
            await stuck.wait_done()  # its send timed out: that stream ended
            got = {}
            for name, stream in (("a", a), ("b", b)):
                got[name] = [(await stream.frame())[0]["offset"] for _ in range(events)]
        assert got["a"] == got["b"] == list(range(1, events + 1))
        assert stuck.stalled.is_set()
        assert replay.stats()["connections"] == 2


async def test_a_reused_offset_is_not_recovered_over_sse_either(served: tuple[Replay, Any]) -> None:
    # protocol.md, "Reused offsets": the entry's time is the time of the event the client had at
    # that offset; another event there now (a store that lost events but kept the epoch) is a gap.
    replay, app = served
    events = [await replay.publish("a", "tick", {"n": n}) for n in range(3)]
    epoch, other_time = events[0].epoch, events[1].time + 1
    async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{epoch}:2:{other_time}"}) as stream:
        sub, sub_id = await stream.frame()
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 3)
        assert sub_id == f"{epoch}:0"
    async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{epoch}:2:{events[1].time}"}) as stream:
        sub, sub_id = await stream.frame()
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, True, 1)
        assert sub_id == f"{epoch}:2:{events[1].time}"


async def test_a_stream_under_base_http_middleware_ends_when_the_client_leaves() -> None:
    # FastAPI's @app.middleware("http") is a BaseHTTPMiddleware: it relays the body through a
    # stream of its own and the disconnect through its receive.
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import Response

    class PassThrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    replay = Replay(authorize=allow_all)
    app = Starlette(routes=[replay.sse_route("/sse")], middleware=[Middleware(PassThrough)], lifespan=replay.lifespan)
    async with running(app) as app_:
        async with AsgiStream(app_, "/sse", query(["a"])) as stream:
            await stream.frame()
            await replay.publish("a", "x", {})
            frame, _ = await stream.frame()
            assert frame["offset"] == 1
        await stream.wait_done()
        assert replay.stats()["connections"] == 0


async def test_a_request_cancelled_while_it_joins_leaves_nothing_behind() -> None:
    class Stalling(MemoryStore):
        stall = False
        stalled = anyio.Event()

        async def position(self, topic: str) -> Any:
            if self.stall:
                self.stalled.set()
                await anyio.sleep_forever()
            return await super().position(topic)

    store = Stalling()
    replay = Replay(store, authorize=allow_all)
    async with running(make_sse_app(replay)) as app:
        store.stall = True
        stream = AsgiStream(app, "/sse", query(["a", "b"]))
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream._run)  # the request, as a server runs it
                await store.stalled.wait()
                assert replay.stats()["subscriptions"] == 1  # "a" joined, "b" reading its head
                tg.cancel_scope.cancel()  # the server gives up on the request
        stream.discard()
        assert stream.status is None  # nothing was sent
        assert replay.stats() == EMPTY


async def test_streams_count_in_the_metrics_as_connections(served: tuple[Replay, Any]) -> None:
    replay, app = served
    events = [await replay.publish("a", "tick", {}) for _ in range(2)]
    async with AsgiStream(app, "/sse", query(["a"]), {"last-event-id": f"{events[0].epoch}:0"}) as stream:
        await stream.frame()
        assert replay.metrics.connections_opened == 1
        assert replay.metrics.sse_streams_opened == 1
        assert replay.stats()["sse_streams"] == replay.stats()["connections"] == 1
        registry = CollectorRegistry(auto_describe=False)
        registry.register(replay.collector())
        text = generate_latest(registry).decode()
        assert "starlette_replay_sse_streams_open 1.0" in text
        assert "starlette_replay_sse_streams_opened_total 1.0" in text
    await stream.wait_done()
    assert replay.stats()["sse_streams"] == 0
    assert replay.metrics.closes == {"peer": 1}  # the client left first
    assert replay.metrics.events_replayed == 2
