"""subscribe / unsubscribe / ack / ping over an in-process socket, as protocol.md says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.websockets import WebSocket

from starlette_replay import Cursor, MemoryStore, Replay, allow_all

from .helpers import Client, connect, make_app, running

pytestmark = pytest.mark.anyio


class Server:
    def __init__(self, replay: Replay, app: Any) -> None:
        self.replay = replay
        self.app = app

    def connect(self, **kwargs: Any) -> Any:
        return connect(self.app, **kwargs)

    async def publish(self, topic: str, n: int, start: int = 0) -> None:
        await self.replay.publish_many(topic, [("tick", {"i": start + i}) for i in range(n)])


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    options: dict[str, Any] = {"authorize": allow_all}
    marker = request.node.get_closest_marker("replay")
    store = MemoryStore(history_size=5)
    if marker is not None:
        options.update(marker.kwargs)
        store = options.pop("store", store)
    replay = Replay(store, **options)
    async with running(make_app(replay)) as app:
        yield Server(replay, app)


def offsets(events: list[dict[str, Any]]) -> list[int]:
    return [e["offset"] for e in events]


async def test_fresh_subscribe_then_live(server: Server) -> None:
    await server.publish("t", 3)
    async with server.connect() as c:
        assert c.subprotocol == "replay.v1"
        sub = await c.subscribe("t", ref="s1")
        epoch = (await server.replay.store.position("t")).epoch
        assert sub == {
            "type": "subscribed",
            "topic": "t",
            "epoch": epoch,
            "offset": 3,
            "resumed": False,
            "recovered": False,
            "replayed": 0,
            "ref": "s1",
        }
        await c.nothing_pending()
        await server.publish("t", 2, start=3)
        events = await c.events(2)
        assert offsets(events) == [4, 5]
        assert [e["data"] for e in events] == [{"i": 3}, {"i": 4}]
        assert events[0]["event"] == "tick" and events[0]["topic"] == "t" and isinstance(events[0]["time"], int)


async def test_subscribe_to_an_empty_topic(server: Server) -> None:
    async with server.connect() as c:
        sub = await c.subscribe("nobody:published")
        assert (sub["offset"], sub["replayed"], "ref" in sub) == (0, 0, False)
        await server.publish("nobody:published", 1)
        assert offsets(await c.events(1)) == [1]


async def test_rewind_and_clamping(server: Server) -> None:
    await server.publish("t", 8)  # history_size 5 retains 4..8
    async with server.connect() as c:
        sub = await c.subscribe("t", rewind=2)
        assert (sub["offset"], sub["replayed"], sub["resumed"], sub["recovered"]) == (8, 2, False, False)
        assert offsets(await c.events(2)) == [7, 8]
        sub = await c.subscribe("u", rewind=0)
        assert sub["replayed"] == 0
    async with server.connect() as c:
        sub = await c.subscribe("t", rewind=1000)
        assert sub["replayed"] == 5
        assert offsets(await c.events(5)) == [4, 5, 6, 7, 8]
        await c.nothing_pending()


async def test_rewind_ignored_with_a_cursor(server: Server) -> None:
    await server.publish("t", 5)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect() as c:
        sub = await c.subscribe("t", epoch=epoch, offset=4, rewind=5)
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, True, 1)
        assert offsets(await c.events(1)) == [5]
        await c.nothing_pending()


@pytest.mark.parametrize(
    ("cursor_offset", "recovered", "replayed", "first"),
    [
        (0, False, 5, 4),  # older than the retained history (4..8)
        (2, False, 5, 4),
        (3, True, 5, 4),  # exactly the one before the oldest retained: nothing lost
        (6, True, 2, 7),
        (8, True, 0, None),  # at the head
        (9, False, 5, 4),  # ahead of the head
        (2**53 - 1, False, 5, 4),
    ],
)
async def test_cursor_resume(server: Server, cursor_offset: int, recovered: bool, replayed: int, first: Any) -> None:
    await server.publish("t", 8)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect() as c:
        sub = await c.subscribe("t", epoch=epoch, offset=cursor_offset)
        assert (sub["offset"], sub["resumed"], sub["recovered"], sub["replayed"]) == (8, True, recovered, replayed)
        if replayed:
            assert offsets(await c.events(replayed)) == list(range(first, 9))
        await c.nothing_pending()
        await server.publish("t", 1)
        assert offsets(await c.events(1)) == [9]


@pytest.mark.parametrize("cursor_offset", [4, 6, 8])
async def test_a_resume_whose_time_differs_is_a_reused_offset(server: Server, cursor_offset: int) -> None:
    # protocol.md, "Reused offsets": the stored event at the cursor is not the one the client had
    await server.publish("t", 8)  # retains 4..8
    store = server.replay.store
    epoch = (await store.position("t")).epoch
    (stored,) = await store.read("t", cursor_offset - 1, 1)
    async with server.connect() as c:
        sub = await c.subscribe("t", epoch=epoch, offset=cursor_offset, time=stored.time)
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, True, 8 - cursor_offset)
        assert offsets(await c.events(8 - cursor_offset)) == list(range(cursor_offset + 1, 9))
        sub = await c.subscribe("t", epoch=epoch, offset=cursor_offset, time=stored.time + 1)
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 5)
        assert offsets(await c.events(5)) == [4, 5, 6, 7, 8]
        await c.nothing_pending()
        await server.publish("t", 1)
        assert offsets(await c.events(1)) == [9]


@pytest.mark.parametrize(("cursor_offset", "recovered"), [(0, False), (3, True)])
async def test_a_time_at_an_offset_no_longer_held_cannot_be_checked(
    server: Server, cursor_offset: int, recovered: bool
) -> None:
    # 3 is the one before the oldest retained (trimmed: the other rules decide), 0 holds no event
    await server.publish("t", 8)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect() as c:
        sub = await c.subscribe("t", epoch=epoch, offset=cursor_offset, time=1)
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, recovered, 5)
        assert offsets(await c.events(5)) == [4, 5, 6, 7, 8]


async def test_cursor_from_another_epoch(server: Server) -> None:
    await server.publish("t", 3)
    async with server.connect() as c:
        sub = await c.subscribe("t", epoch="0000000000000000", offset=2)
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 3)
        assert offsets(await c.events(3)) == [1, 2, 3]
        await c.nothing_pending()


async def test_unsubscribe(server: Server) -> None:
    async with server.connect() as c:
        await c.subscribe("t")
        assert await c.request({"type": "unsubscribe", "topic": "t", "ref": 9}) == {
            "type": "unsubscribed",
            "topic": "t",
            "ref": 9,
        }
        await server.publish("t", 2)
        await c.nothing_pending()
        error = await c.request({"type": "unsubscribe", "topic": "t", "ref": "again"})
        assert (error["type"], error["code"], error["topic"], error["ref"]) == ("error", "not_subscribed", "t", "again")
        assert server.replay.stats()["subscriptions"] == 0


async def test_ping(server: Server) -> None:
    async with server.connect() as c:
        assert await c.request({"type": "ping"}) == {"type": "pong"}
        assert await c.request({"type": "ping", "ref": 0}) == {"type": "pong", "ref": 0}


async def test_bad_frame_keeps_the_connection(server: Server) -> None:
    async with server.connect() as c:
        error = await c.request({"type": "subscribe", "topic": "bad topic", "ref": "r"})
        assert (error["type"], error["code"], error["ref"]) == ("error", "bad_request", "r")
        assert "topic" in error["message"]
        error = await c.request({"type": "subscribe", "topic": "t", "offset": 3})
        assert error["code"] == "bad_request" and "epoch" in error["message"]
        await c.send_text("{nope")
        assert (await c.recv())["code"] == "bad_request"
        await c.subscribe("t")


async def test_resubscribe_replaces_without_duplicates(server: Server) -> None:
    await server.publish("t", 3)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect() as c:
        await c.subscribe("t")
        await server.publish("t", 1)
        assert offsets(await c.events(1)) == [4]
        # the client noticed a gap after 1 and repairs it
        sub = await c.subscribe("t", epoch=epoch, offset=1, ref="again")
        assert (sub["ref"], sub["recovered"], sub["replayed"]) == ("again", True, 3)
        assert offsets(await c.events(3)) == [2, 3, 4]
        await server.publish("t", 1)
        assert offsets(await c.events(1)) == [5]
        await c.nothing_pending()
        stats = server.replay.stats()
        assert (stats["subscriptions"], stats["topics"]) == (1, 1)


@pytest.mark.replay(max_subscriptions=2)
async def test_max_subscriptions(server: Server) -> None:
    async with server.connect() as c:
        await c.subscribe("a")
        await c.subscribe("b")
        error = await c.request({"type": "subscribe", "topic": "c", "ref": 3})
        assert (error["code"], error["topic"], error["ref"]) == ("too_many_subscriptions", "c", 3)
        await c.subscribe("b")  # replacing a held topic is not a new one
        await c.request({"type": "unsubscribe", "topic": "a"})
        await c.subscribe("c")


# --- authorization ------------------------------------------------------------------------------------


@pytest.mark.replay(authorize=None)
async def test_default_authorize_refuses_and_says_how_to_configure(server: Server) -> None:
    async with server.connect() as c:
        error = await c.request({"type": "subscribe", "topic": "t", "ref": 1})
        assert (error["type"], error["code"], error["topic"], error["ref"]) == ("error", "forbidden", "t", 1)
        assert "authorize=" in error["message"] and "allow_all" in error["message"]
        assert server.replay.stats()["subscriptions"] == 0


async def _only_public(websocket: WebSocket, topic: str) -> bool:
    await anyio.lowlevel.checkpoint()
    return topic.startswith("public:")


@pytest.mark.replay(authorize=_only_public)
async def test_async_authorize(server: Server) -> None:
    async with server.connect() as c:
        await c.subscribe("public:news")
        error = await c.request({"type": "subscribe", "topic": "private:x"})
        assert (error["code"], error["topic"]) == ("forbidden", "private:x")
        assert server.replay.stats()["subscriptions"] == 1


@pytest.mark.replay(authorize=lambda ws, topic: "yes")
async def test_authorize_must_return_true_exactly(server: Server) -> None:
    async with server.connect() as c:
        error = await c.request({"type": "subscribe", "topic": "t"})
        assert error["code"] == "forbidden"


def _crashing(websocket: WebSocket, topic: str) -> bool:
    if topic == "boom":
        raise KeyError("db down")
    return True


@pytest.mark.replay(authorize=_crashing)
async def test_authorize_raising_is_internal_and_connection_serves_on(server: Server) -> None:
    async with server.connect() as c:
        error = await c.request({"type": "subscribe", "topic": "boom", "ref": "b"})
        assert (error["code"], error["topic"], error["ref"]) == ("internal", "boom", "b")
        assert "db down" not in error["message"]
        await c.subscribe("fine")
        assert server.replay.stats()["subscriptions"] == 1


# --- acks and stored cursors ---------------------------------------------------------------------------


def _where(cursor: Cursor | None) -> tuple[str, int] | None:
    """A stored cursor's epoch and offset (its time is tested apart)."""
    return None if cursor is None else (cursor.epoch, cursor.offset)


def _identity(websocket: WebSocket) -> str | None:
    return websocket.query_params.get("user")


@pytest.mark.replay(identify=_identity)
async def test_ack_then_reconnect_resumes_from_stored_cursor(server: Server) -> None:
    await server.publish("t", 4)
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t", rewind=4)
        assert (sub["resumed"], sub["replayed"]) == (False, 4)
        events = await c.events(4)
        # no reply to an ack; ordering guarantees it is stored before the ping
        await c.send({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": events[1]["offset"], "ref": 1})
        await c.nothing_pending()
    assert await server.replay.store.load_cursor("alice", "t") == Cursor(sub["epoch"], 2, events[1]["time"])
    await server.publish("t", 1)
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t", rewind=1)  # rewind ignored: the stored cursor is used
        assert (sub["resumed"], sub["recovered"], sub["replayed"], sub["offset"]) == (True, True, 3, 5)
        assert offsets(await c.events(3)) == [3, 4, 5]
        # an explicit cursor wins over the stored one
        sub = await c.subscribe("t", epoch=sub["epoch"], offset=4)
        assert (sub["resumed"], sub["replayed"]) == (True, 1)
    async with server.connect(path="/ws?user=bob") as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (False, False, 0)


@pytest.mark.replay(identify=_identity)
async def test_stored_cursor_too_old_is_not_recovered(server: Server) -> None:
    await server.publish("t", 2)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect(path="/ws?user=alice") as c:
        await c.subscribe("t")
        await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": 1})
        await c.nothing_pending()
    await server.publish("t", 6)  # retains 4..8
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 5)
        assert offsets(await c.events(5)) == [4, 5, 6, 7, 8]


@pytest.mark.replay(identify=_identity)
async def test_a_stored_cursor_keeps_the_time_and_a_reused_offset_is_not_recovered(server: Server) -> None:
    await server.publish("t", 3)
    store = server.replay.store
    epoch = (await store.position("t")).epoch
    async with server.connect(path="/ws?user=alice") as c:
        await c.subscribe("t", rewind=3)
        events = await c.events(3)
        await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": 2, "time": events[1]["time"]})
        await c.nothing_pending()
    assert await store.load_cursor("alice", "t") == Cursor(epoch, 2, events[1]["time"])
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, True, 1)
    # The store's event at offset 2 is another one than the acked (as after a fail-over that lost it)
    await store.save_cursor("alice", "t", Cursor(epoch, 3, events[2]["time"] + 1))
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 3)
        assert offsets(await c.events(3)) == [1, 2, 3]


@pytest.mark.replay(identify=_identity)
async def test_an_ack_of_a_trimmed_event_is_stored_without_a_time(server: Server) -> None:
    store = server.replay.store
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t")
        await server.publish("t", 8)  # retains 4..8
        assert offsets(await c.events(8)) == list(range(1, 9))
        await c.send({"type": "ack", "topic": "t", "epoch": sub["epoch"], "offset": 2})
        await c.nothing_pending()
    assert await store.load_cursor("alice", "t") == Cursor(sub["epoch"], 2, None)


@pytest.mark.replay(identify=_identity)
async def test_acks_move_forward_within_an_epoch(server: Server) -> None:
    await server.publish("t", 5)
    store = server.replay.store
    epoch = (await store.position("t")).epoch
    async with server.connect(path="/ws?user=alice") as c:
        await c.subscribe("t")
        for offset in (4, 2, 3):
            await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": offset})
        await c.nothing_pending()
        assert _where(await store.load_cursor("alice", "t")) == (epoch, 4)


@pytest.mark.replay(identify=_identity)
async def test_an_ack_in_the_topics_new_epoch_replaces_a_cursor_of_another(server: Server) -> None:
    await server.publish("t", 3)
    store = server.replay.store
    epoch = (await store.position("t")).epoch
    await store.save_cursor("alice", "t", Cursor("lost-epoch", 9))
    async with server.connect(path="/ws?user=alice") as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["recovered"], sub["replayed"]) == (True, False, 3)
        assert offsets(await c.events(3)) == [1, 2, 3]
        await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": 2})
        await c.nothing_pending()
    assert _where(await store.load_cursor("alice", "t")) == (epoch, 2)


@pytest.mark.replay(identify=_identity)
async def test_an_ack_past_what_was_delivered_is_refused(server: Server) -> None:
    await server.publish("t", 3)
    store = server.replay.store
    epoch = (await store.position("t")).epoch
    async with server.connect(path="/ws?user=alice") as c:
        await c.subscribe("t", rewind=3)
        assert offsets(await c.events(3)) == [1, 2, 3]
        await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": 2})
        for bad, ref in (({"epoch": epoch, "offset": 4}, "ahead"), ({"epoch": "old-epoch", "offset": 1}, "stale")):
            error = await c.request({"type": "ack", "topic": "t", **bad, "ref": ref})
            assert (error["type"], error["code"], error["topic"], error["ref"]) == ("error", "bad_request", "t", ref)
            assert "delivered" in error["message"]
        # the connection still serves, and the refused acks stored nothing
        await server.publish("t", 1)
        assert offsets(await c.events(1)) == [4]
    assert _where(await store.load_cursor("alice", "t")) == (epoch, 2)


async def test_ack_without_identity_is_ignored(server: Server) -> None:
    await server.publish("t", 2)
    epoch = (await server.replay.store.position("t")).epoch
    async with server.connect() as c:
        await c.subscribe("t")
        await c.send({"type": "ack", "topic": "t", "epoch": epoch, "offset": 2, "ref": "a"})
        await c.nothing_pending()
    async with server.connect() as c:
        sub = await c.subscribe("t")
        assert (sub["resumed"], sub["replayed"]) == (False, 0)


@pytest.mark.replay(identify=_identity)
async def test_ack_for_a_topic_not_held(server: Server) -> None:
    async with server.connect(path="/ws?user=alice") as c:
        error = await c.request({"type": "ack", "topic": "t", "epoch": "e", "offset": 1, "ref": 5})
        assert (error["type"], error["code"], error["topic"], error["ref"]) == ("error", "not_subscribed", "t", 5)
    assert await server.replay.store.load_cursor("alice", "t") is None


async def test_two_clients_each_get_every_event(server: Server) -> None:
    async with server.connect() as a, server.connect() as b:
        await a.subscribe("t")
        await b.subscribe("t")
        await server.publish("t", 3)
        assert offsets(await a.events(3)) == [1, 2, 3]
        assert offsets(await b.events(3)) == [1, 2, 3]
        assert server.replay.stats()["connections"] == 2


async def test_client_helper_sees_clean_close(server: Server) -> None:
    async with server.connect() as c:
        assert isinstance(c, Client)
        await c.ws.close()
    assert server.replay.stats()["connections"] == 0


async def test_lone_surrogate_ref_gets_an_error_and_the_connection_stays(server: Server) -> None:
    async with server.connect() as c:
        await c.send_text(r'{"type": "ping", "ref": "\ud800"}')
        error = await c.recv()
        assert (error["type"], error["code"], "ref" in error) == ("error", "bad_request", False)
        await c.nothing_pending()
