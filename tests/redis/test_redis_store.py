"""What is particular to RedisStore: keys, scripts, the listener, the client it is given."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis.asyncio

from starlette_replay import Cursor, RedisStore, Replay, StoreUnavailable, allow_all
from tests.redis_server import RecordingSink, RedisServer, attached, connected

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def test_importing_works_without_redis_py_and_constructing_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from starlette_replay import RedisStore\n"
        "try:\n"
        "    RedisStore.from_url('redis://127.0.0.1:1')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "starlette-replay[redis]" in result.stdout


@pytest.mark.parametrize(
    "options",
    [
        {"history_size": 0},
        {"history_size": True},
        {"history_ttl": 0},
        {"publish_timeout": -1},
        {"cursor_ttl": "1"},
        {"prefix": "a{b}"},
        {"prefix": ""},
        {"connections": 0},
        {"connections": 2.5},
    ],
)
def test_bad_options_raise_value_error(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RedisStore.from_url("redis://127.0.0.1:1", **options)


async def test_all_keys_of_a_topic_share_its_hash_tag_and_ttl(redis_server: RedisServer) -> None:
    async with connected(redis_server.url, prefix="tag", history_ttl=60) as (store, _):
        await store.append("user:42", [("e", "1")], idempotency_key="k")
        await store.save_cursor("alice", "user:42", Cursor("x", 1))
        with redis_server.client() as client:
            keys = sorted(key.decode() for key in client.keys("tag:*"))
            assert keys == [
                "tag:{user:42}:cursor:alice",
                "tag:{user:42}:idem",
                "tag:{user:42}:idemz",
                "tag:{user:42}:log",
                "tag:{user:42}:meta",
            ]
            for key in keys:
                ttl = client.pttl(key)
                limit = 30 * 24 * 3600 * 1000 if ":cursor:" in key else 60_000
                assert 0 < ttl <= limit, key
            # stream entry ids are the offsets
            assert [entry_id for entry_id, _ in client.xrange("tag:{user:42}:log")] == [b"1-0"]


async def test_idempotency_keys_are_forgotten_with_the_history_they_name(redis_server: RedisServer) -> None:
    async with connected(redis_server.url, prefix="idem", history_size=3) as (store, _):
        (first,) = await store.append("t", [("e", "1")], idempotency_key="k")
        assert await store.append("t", [("e", "again")], idempotency_key="k") == [first]
        await store.append("t", [("e", str(i)) for i in range(3)])  # trims offset 1 away
        (stored,) = await store.append("t", [("e", "new")], idempotency_key="k")
        assert stored.offset == 5
        with redis_server.client() as client:
            assert client.hlen("idem:{t}:idem") == 1 and client.zcard("idem:{t}:idemz") == 1


async def test_a_skipped_live_message_is_repaired_from_the_stream(redis_server: RedisServer) -> None:
    async with connected(redis_server.url, prefix="gap") as (store, sink):
        await store.subscribe("t")
        (one,) = await store.append("t", [("e", "1")])
        # an event stored without its PUBLISH (as if the message were lost on the way)
        with redis_server.client() as client:
            client.hincrby("gap:{t}:meta", "head", 1)
            client.xadd("gap:{t}:log", {"t": "e", "d": "2", "ms": "1700000000000"}, id="2-0")
        (three,) = await store.append("t", [("e", "3")])
        await sink.wait_for(lambda: len(sink.of("t")) == 3)
        assert [e.offset for e in sink.of("t")] == [1, 2, 3]
        assert sink.of("t")[1].raw == "2" and sink.of("t")[2] == three and sink.of("t")[0] == one
        # a malformed message (not ours) is ignored without dropping the connection
        reconnects = store.reconnects
        with redis_server.client() as client:
            client.publish("gap:{t}:live", "not|a|replay|message")
            client.publish("gap:{t}:live", f"{one.epoch}|9|1|1|5:e")
        # a replayed (duplicate) message is dropped
        with redis_server.client() as client:
            client.publish("gap:{t}:live", f"{one.epoch}|1|{one.time}|1|1:e1:1")
        (four,) = await store.append("t", [("e", "4")])
        await sink.wait_for(lambda: len(sink.of("t")) >= 4)
        assert [e.offset for e in sink.of("t")] == [1, 2, 3, 4] and sink.of("t")[3] == four
        assert sink.resets == []
        assert store.reconnects == reconnects


async def test_a_given_client_lends_its_settings_and_stays_open(redis_server: RedisServer) -> None:
    # RESP3 and decoded responses on the app's client, a pool of one connection: the
    # store opens connections of its own with those settings, takes none from the
    # pool, and aclose() closes them but not the client.
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=redis_server.port, protocol=3, decode_responses=True, max_connections=1
    )
    try:
        store = RedisStore(client, prefix="own", publish_timeout=3)
        sink = RecordingSink()
        async with store.connect(sink):
            await store.subscribe("t")
            published = await store.append("t", [("e", '{"a": 1}'), ("e", '"b"')], idempotency_key="k")
            assert await store.append("t", [("e", "x")], idempotency_key="k") == published
            await sink.wait_for(lambda: len(sink.of("t")) == 2)
            assert sink.of("t") == published
            assert await store.read("t", 0, 10) == published
            await store.save_cursor("i", "t", Cursor(published[0].epoch, 2))
            assert await store.load_cursor("i", "t") == Cursor(published[0].epoch, 2)
            assert await client.ping() is True  # its one pooled connection was free all along
        await store.aclose()
        assert await client.ping() is True
    finally:
        await client.aclose()


class _ConnectionOfRedisPy50(redis.asyncio.Connection):
    """A connection as redis-py 5.0 with hiredis made them: no ``can_read()``, and a
    ``can_read_destructive()`` that takes a reply already buffered (``Reader.gets()``)
    and loses it."""

    can_read = None  # type: ignore[assignment]

    async def can_read_destructive(self) -> bool:
        if await redis.asyncio.Connection.can_read(self):
            await self.read_response(disable_decoding=True)  # taken from the buffer, and dropped
            return True
        return False


async def test_live_messages_are_not_lost_to_a_destructive_can_read(redis_server: RedisServer) -> None:
    # Seen with redis-py 5.0.8 and hiredis 3.5: a burst lost its last messages (the
    # listener batched buffered replies through can_read_destructive), for good when
    # the topic fell silent after them. Without can_read() the listener reads one
    # reply at a time.
    pool = redis.asyncio.ConnectionPool(
        host="127.0.0.1", port=redis_server.port, connection_class=_ConnectionOfRedisPy50
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    try:
        async with attached(RedisStore(client, prefix=f"d{secrets.token_hex(4)}", publish_timeout=3)) as (
            store,
            sink,
        ):
            topics = [f"burst:{i}" for i in range(30)]
            for topic in topics:
                await store.subscribe(topic)

            async def publish(topic: str) -> None:
                for i in range(5):
                    await store.append(topic, [("e", str(i)), ("e", str(i))])

            async with anyio.create_task_group() as tg:
                for topic in topics:
                    tg.start_soon(publish, topic)
            await sink.wait_for(lambda: len(sink.events) == 300)
            assert all([e.offset for e in sink.of(topic)] == list(range(1, 11)) for topic in topics)
    finally:
        await client.aclose()


def _store_connections(server: RedisServer, prefix: str) -> int:
    """Connections to ``server`` named after a store's client (``client_name``)."""
    with server.client() as client:
        return sum(1 for info in client.client_list() if info["name"] == prefix)


async def test_commands_share_the_configured_connections_and_aclose_closes_them(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="few", publish_timeout=3, client_name="few", connections=3)
    async with anyio.create_task_group() as tg:
        for i in range(40):  # forty commands at once, pipelined on three connections
            tg.start_soon(store.position, f"t{i}")
    assert _store_connections(redis_server, "few") == 3
    await store.position("t")
    assert _store_connections(redis_server, "few") == 3  # reused, none opened
    await store.aclose()
    with anyio.fail_after(5):
        while _store_connections(redis_server, "few"):  # noqa: ASYNC110 - the closes reach Redis
            await anyio.sleep(0.02)
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.position("t")


async def test_an_idle_connection_closed_by_redis_is_reopened_before_a_command(redis_server: RedisServer) -> None:
    # An unkeyed append is never retried once sent: sent on a connection Redis had
    # closed while it sat idle, it would fail with "may or may not be stored".
    async with connected(redis_server.url, prefix="stale", client_name="stale") as (store, _):
        await store.append("t", [("e", "0")])
        with redis_server.client() as client:
            killed = client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        await anyio.sleep(0.1)  # the close reaches the store's idle connection
        (event,) = await store.append("t", [("e", "1")])
        assert event.offset == 2


async def test_startup_warns_about_lost_writes_and_eviction(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(appendonly=False, extra=("--maxmemory-policy", "allkeys-lru"))
    with caplog.at_level(logging.WARNING, logger="starlette_replay.stores.redis"):
        async with connected(server.url):
            pass
    text = caplog.text
    assert "appendonly=no" in text and "allkeys-lru" in text


async def test_startup_with_config_disabled_warns_it_cannot_check(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(extra=("--rename-command", "CONFIG", ""))
    with caplog.at_level(logging.WARNING, logger="starlette_replay.stores.redis"):
        async with connected(server.url) as (store, _):
            (event,) = await store.append("t", [("e", "1")])
            assert event.offset == 1
    assert "cannot read Redis's persistence settings" in caplog.text


async def test_a_durable_server_gives_no_warning(
    redis_server_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(appendonly=True)
    with caplog.at_level(logging.WARNING, logger="starlette_replay.stores.redis"):
        async with connected(server.url):
            pass
    assert caplog.records == []


async def test_replay_publishes_and_reads_history_through_redis(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="facade")
    async with Replay(store, authorize=allow_all) as replay:
        event = await replay.publish("t", "greeting", {"text": "hi"})
        many = await replay.publish_many("t", [("a", 1), ("b", [2])])
        assert [e.offset for e in [event, *many]] == [1, 2, 3]
        assert await replay.history("t") == [event, *many]
        assert (await replay.history("t", after=1, limit=1))[0].data == 1
    with anyio.fail_after(5):
        await store.aclose()  # again: safe


async def test_a_watched_topic_does_not_expire_but_an_unwatched_one_does(redis_server: RedisServer) -> None:
    async with connected(redis_server.url, prefix="watch", history_ttl=0.3) as (store, sink):
        await store.subscribe("watched")
        (watched,) = await store.append("watched", [("e", "1")])
        (unwatched,) = await store.append("unwatched", [("e", "1")])
        await anyio.sleep(1.0)  # the TTL passing is what is under test
        assert (await store.position("unwatched")).epoch != unwatched.epoch
        position = await store.position("watched")
        assert (position.epoch, position.head) == (watched.epoch, 1)
        await store.unsubscribe("watched")
        await anyio.sleep(1.0)
        assert (await store.position("watched")).epoch != watched.epoch
        assert sink.resets == []


def test_a_client_without_a_connection_pool_is_refused() -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisStore(object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("EVALSHA", "a" * 40, 4, "k:{t}:meta", "", 0, -1, 10_000, b"\x00\xff raw", '{"text":"héllo ☃ 𝄞"}'),
        ("HMGET", "replay:{user:42}:cursor:alice", "e", "o"),
        ("SET", "k", 1.5, "PX", 100),
    ],
)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[Any, ...]) -> None:
    from redis.asyncio.connection import Connection

    from starlette_replay.stores.redis._codec import pack_in_python, packer

    expected = b"".join(Connection().pack_command(*args))
    assert pack_in_python(args) == expected
    assert packer()(args) == expected  # hiredis's, where installed (it is, with the redis extra)


def test_packing_refuses_what_is_not_a_redis_argument() -> None:
    from starlette_replay.stores.redis._codec import pack_in_python

    with pytest.raises(TypeError, match="NoneType"):
        pack_in_python(("SET", "k", None))


async def test_a_store_connected_again_serves_its_new_hub(redis_server: RedisServer) -> None:
    # Leaving connect() forgets the subscriptions (and closes the connections): the
    # next hub gets its own topics' events and nothing of the old ones.
    store = RedisStore.from_url(redis_server.url, prefix="again", publish_timeout=3)
    try:
        first = RecordingSink()
        async with store.connect(first):
            await store.subscribe("t")
            await store.append("t", [("e", "1")])
            await first.wait_for(lambda: len(first.of("t")) == 1)
        second = RecordingSink()
        async with store.connect(second):
            await store.subscribe("u")
            with redis_server.client() as client:
                client.publish("again:{t}:live", "x|1|1|1|1:e1:1")  # a stray message on the old channel
            (event,) = await store.append("u", [("e", "2")])
            await second.wait_for(lambda: second.of("u") == [event])
            assert second.of("t") == [] and second.resets == []
    finally:
        await store.aclose()


async def test_aclose_ends_the_connections_tasks(redis_server: RedisServer) -> None:
    import asyncio

    def pipe_tasks() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if task.get_name().startswith("starlette_replay redis command")]

    store = RedisStore.from_url(redis_server.url, prefix="tasks", publish_timeout=3)
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(store.position, f"t{i}")
    assert pipe_tasks()  # each connection's writer and reader
    await store.aclose()
    assert pipe_tasks() == []
