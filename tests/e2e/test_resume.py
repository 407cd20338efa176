"""The lost answer: events published while a client is away reach it exactly once when it comes back."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, assert_exact
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "task:42"


async def publish(http: httpx.AsyncClient, topic: str, count: int, tag: str) -> tuple[str, int]:
    response = await http.post("/publish", json={"topic": topic, "count": count, "tag": tag})
    response.raise_for_status()
    body = response.json()
    return body["epoch"], body["last"]


async def first_subscribed(client: Subscriber) -> Subscribed:
    frame = await client.recv()
    assert isinstance(frame, Subscribed), frame
    return frame


@pytest.mark.parametrize("abort", [False, True], ids=["clean-close", "dead-tcp"])
async def test_missed_events_arrive_once_in_order_then_live(
    uvicorn_servers: ServerFactory, abort: bool, store_env: dict[str, str]
) -> None:
    server = uvicorn_servers(env=store_env)
    client = Subscriber(server.ws_url(), [TOPIC], name="tab")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        with anyio.fail_after(15):
            await client.connect()
            first = await first_subscribed(client)
            assert (first.resumed, first.recovered, first.replayed) == (False, False, 0)
            epoch, _ = await publish(http, TOPIC, 3, "before")
            await client.read_until({TOPIC: 3})
            await client.drop(abort=abort)

            # The answer lands while nobody is connected.
            _, last = await publish(http, TOPIC, 5, "missed")
            assert last == 8

            await client.connect()
            again = await first_subscribed(client)
            assert (again.epoch, again.offset) == (epoch, 8)
            assert (again.resumed, again.recovered, again.replayed) == (True, True, 5)
            await client.read_until({TOPIC: 8})
            _, last = await publish(http, TOPIC, 2, "after")
            await client.read_until({TOPIC: last})
            await client.drop()

    assert_exact([client], {TOPIC: (epoch, 10)})
    assert [d.data["tag"] for d in client.delivered[TOPIC]] == ["before"] * 3 + ["missed"] * 5 + ["after"] * 2
    # On the wire of the second connection: `subscribed` first, then exactly 4..10 of the topic.
    second = [json.loads(text) for text in client.connections[1]]
    assert second[0]["type"] == "subscribed"
    assert [f["offset"] for f in second[1:] if f["type"] == "event"] == list(range(4, 11))


async def test_stored_cursor_resumes_an_identity_without_a_cursor(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    """A client that lost its cursor (a reloaded page) resumes from the cursor its acks stored."""
    server = uvicorn_servers(env=store_env)
    url = server.ws_url("/ws?identity=user-7")
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        with anyio.fail_after(15):
            tab = Subscriber(url, [TOPIC], name="tab-1")
            await tab.connect()
            await first_subscribed(tab)
            epoch, _ = await publish(http, TOPIC, 4, "seen")
            await tab.read_until({TOPIC: 4})
            await tab.send({"type": "ack", "topic": TOPIC, "epoch": epoch, "offset": 4})
            # Frames of one connection are handled in order: once the pong is back, the ack is stored.
            await tab.send({"type": "ping", "ref": "sync"})
            while tab.connections[-1][-1] != '{"type":"pong","ref":"sync"}':
                await tab.recv()
            await tab.drop()

            await publish(http, TOPIC, 3, "missed")
            reloaded = Subscriber(url, [TOPIC], name="tab-2", rewind=0, stored_cursor=True)
            await reloaded.connect()
            frame = await first_subscribed(reloaded)
            assert (frame.resumed, frame.recovered, frame.offset, frame.replayed) == (True, True, 7, 3)
            await reloaded.read_until({TOPIC: 7})
            await reloaded.drop()

    assert reloaded.offsets(TOPIC) == [5, 6, 7]
    assert [d.data["tag"] for d in reloaded.delivered[TOPIC]] == ["missed"] * 3
    assert not reloaded.violations


async def test_resume_older_than_the_retained_history_says_so(uvicorn_servers: ServerFactory) -> None:
    """A cursor the store no longer covers: `recovered` false, and everything retained is replayed."""
    server = uvicorn_servers(env={"REPLAY_HISTORY_SIZE": 10})
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5.0) as http:
        epoch, last = await publish(http, TOPIC, 30, "old")
        client = Subscriber(server.ws_url(), [TOPIC], name="late", expect_recovered=False)
        client.cursors[TOPIC] = (epoch, 5)
        try:
            with anyio.fail_after(10):
                await client.connect()
                frame = await first_subscribed(client)
                assert (frame.resumed, frame.recovered, frame.offset, frame.replayed) == (True, False, 30, 10)
                await client.read_until({TOPIC: last})
                await client.drop()
        finally:
            client.abort()
    assert client.offsets(TOPIC) == list(range(21, 31))
    assert client.violations == []
