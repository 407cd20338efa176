"""Health with a real redis-server (issue 17): a frozen Redis and a killed listener make the
store unready, and it is ready again once they are back, each within a stated bound.

The store publishes a probe to itself every ``health_check_interval / 5`` s
(0.2 s here) through its command connections and its listener; it is unready
once either has been silent for ``health_check_interval`` (1 s here). The tests
wait on the probe's ticks (every 0.2 s, and on every answer or probe received),
never on a sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from starlette_replay import Health, RedisStore, Replay, allow_all
from tests.redis_server import RedisServer, connected

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

INTERVAL = 1.0  # health_check_interval: probes every 0.2 s, unready after 1 s of silence
# Generous: the state changes within INTERVAL + a probe period; the margin is for a loaded machine.
BAD_WITHIN = 6.0
# Back: after a freeze or a kill the listener may be in its reconnect backoff (at most 2 s)
# and a connection attempt may wait for publish_timeout (3 s) first.
GOOD_WITHIN = 15.0


async def health_becomes(
    store: RedisStore, ready: bool, within: float, check: Callable[[Health], bool] | None = None
) -> float:
    """Wait until ``store.health().ready is ready`` (and ``check`` holds); returns the seconds it took."""
    start = time.monotonic()
    with anyio.fail_after(within):
        while True:
            found = store.health()
            if found.ready is ready and (check is None or check(found)):
                return time.monotonic() - start
            await store._probe.changed()


async def test_ready_once_the_first_probe_came_through(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="h-first", health_check_interval=INTERVAL, publish_timeout=3)
    assert not store.health().ready  # not connected
    async with connected(redis_server.url, prefix="h-first", health_check_interval=INTERVAL) as (store, _):
        await health_becomes(store, True, BAD_WITHIN)
        assert store.health().checks == {"redis_commands": "ok", "redis_listener": "ok"}
    assert store.health() == Health(False, {"redis": "not connected (the store's connect() is not entered)"})


async def test_a_frozen_redis_makes_the_replay_unready_and_it_comes_back(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, prefix="h", health_check_interval=INTERVAL, publish_timeout=3)
    replay = Replay(store, authorize=allow_all)
    app = Starlette(routes=[replay.health_route("/health"), replay.metrics_route("/metrics")])

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
            with anyio.fail_after(5):
                return await http.get(path)

    async with replay:
        await health_becomes(store, True, BAD_WITHIN)
        response = await get("/health")
        assert response.status_code == 200
        assert response.json() == {
            "ready": True,
            "checks": {"replay": "running", "redis_commands": "ok", "redis_listener": "ok"},
        }
        server.freeze()
        try:
            took = await health_becomes(
                store, False, BAD_WITHIN, lambda h: "ok" not in (h.checks["redis_commands"], h.checks["redis_listener"])
            )
            # not before the bound (less the probe period before the freeze): a short pause is no outage
            assert took >= INTERVAL * 0.7
            response = await get("/health")
            assert response.status_code == 503
            body = response.json()
            assert body["ready"] is False
            assert body["checks"]["redis_commands"].startswith("no answer to the probe for")
            assert body["checks"]["redis_listener"].startswith("no probe received for")
            # the probe's PUBLISH waits for its answer: a command in flight (between a probe
            # given up after publish_timeout and the next one, none: wait for one)
            with anyio.fail_after(BAD_WITHIN):
                while store.commands_in_flight < 1:
                    await store._probe.changed()
            families = {f.name: f for f in text_string_to_metric_families((await get("/metrics")).text)}
            assert families["starlette_replay_ready"].samples[0].value == 0
            assert families["starlette_replay_redis_commands_in_flight"].samples[0].value >= 1
        finally:
            server.thaw()
        await health_becomes(store, True, GOOD_WITHIN)
        assert (await get("/health")).status_code == 200
    assert (await get("/health")).json() == {"ready": False, "checks": {"replay": "not running"}}


async def test_a_killed_listener_connection_makes_the_store_unready_until_it_resubscribes(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    async with connected(server.url, prefix="h", health_check_interval=INTERVAL) as (store, _):
        await health_becomes(store, True, BAD_WITHIN)
        reconnects = store.reconnects
        with server.client() as client:
            # Keep the listener out after the kill (its SUBSCRIBE is refused), so that the
            # unready state lasts long enough to be seen; commands (PUBLISH) still work.
            client.execute_command("ACL", "SETUSER", "default", "-subscribe")
        assert await anyio.to_thread.run_sync(server.kill_pubsub_clients) == 1
        await health_becomes(store, False, BAD_WITHIN)
        found = store.health()
        assert found.checks["redis_commands"] == "ok"  # Redis answers: only the listener is out
        assert found.checks["redis_listener"].startswith("no probe received")
        with server.client() as client:
            client.execute_command("ACL", "SETUSER", "default", "+subscribe")
        await health_becomes(store, True, GOOD_WITHIN)
        assert store.reconnects > reconnects


async def test_a_plain_client_kill_is_reconnected_and_ready_again(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    async with connected(server.url, prefix="h", health_check_interval=INTERVAL) as (store, _):
        await health_becomes(store, True, BAD_WITHIN)
        reconnects = store.reconnects
        received = store._probe.received_at
        assert await anyio.to_thread.run_sync(server.kill_pubsub_clients) == 1
        # ready again only on a probe that came through the new connection
        await health_becomes(
            store,
            True,
            GOOD_WITHIN,
            lambda h: (
                store.reconnects == reconnects + 1
                and store._probe.received_at is not None
                and received is not None
                and store._probe.received_at > received
            ),
        )
