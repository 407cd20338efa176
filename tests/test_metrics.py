"""Metrics (issue 17): the exposition parses, and the counters move by exactly what a scripted scenario does.

The scenario runs connections on fake sockets (``serve_fake``: what the endpoint
does after accept, tracked in the registry the same way) so that every frame
and every close is known; the figures are read through the real
``metrics_route`` (Prometheus text, parsed by prometheus-client's parser) and,
once the Replay has stopped, through ``replay.collector()`` in a registry of
the test's own (the way an app serves them beside its other metrics).
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from starlette_replay import (
    Event,
    EventStore,
    Health,
    InvalidEvent,
    InvalidTopic,
    MemoryStore,
    NotRunning,
    Replay,
    StoreError,
    StoreUnavailable,
    allow_all,
)
from starlette_replay.metrics import LAG_SAMPLE_EVERY, Histogram, Metrics

from .helpers import TIMEOUT, FakeWebSocket, serve_fake
from .redis_server import free_port

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FailingStore(MemoryStore):
    """A MemoryStore whose next append raises ``fail`` (the store refusing or unreachable)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fail: Exception | None = None

    async def append(
        self, topic: str, items: Sequence[tuple[str, str]], *, idempotency_key: str | None = None
    ) -> list[Event]:
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return await super().append(topic, items, idempotency_key=idempotency_key)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("starlette_replay_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(app: Any, accept: str | None = None) -> httpx.Response:
    headers = {"accept": accept} if accept else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        with anyio.fail_after(TIMEOUT):
            response = await http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def counters(samples: Samples) -> Samples:
    """The counters and the histograms' counts: not the gauges, nor the timings (bucket
    bounds other than +Inf, sums), which no script fixes."""
    return {
        key: v
        for key, v in samples.items()
        if key[0].endswith(("_total", "_count")) or (key[0].endswith("_bucket") and dict(key[1])["le"] == "+Inf")
    }


def c(name: str, v: float, **labels: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], float]:
    return (name, tuple(sorted(labels.items()))), float(v)


async def test_the_counters_move_by_exactly_what_a_scripted_scenario_does() -> None:
    store = FailingStore(history_size=4)
    replay = Replay(store, authorize=allow_all, send_queue_size=8)
    app = Starlette(routes=[replay.metrics_route("/metrics")])
    sockets: dict[str, FakeWebSocket] = {}

    async def subscribe(tg: anyio.abc.TaskGroup, name: str, frames: int, **frame: Any) -> FakeWebSocket:
        ws = sockets[name] = FakeWebSocket()
        tg.start_soon(serve_fake, replay, ws, name)
        await ws.client_sends({"type": "subscribe", **frame})
        await ws.wait_for(frames)
        assert ws.sent[0]["type"] == "subscribed", ws.sent
        return ws

    async with replay:
        before = counters(parse((await scrape(app)).text))
        async with anyio.create_task_group() as tg:
            a = await subscribe(tg, "a", 1, topic="t")
            epoch = a.sent[0]["epoch"]
            for i in range(16):
                await replay.publish("t", "e", {"i": i})
                await a.wait_for(2 + i)
            with pytest.raises(InvalidTopic):
                await replay.publish("bad topic", "e", 1)
            with pytest.raises(InvalidEvent):
                await replay.publish("t", "e", {1, 2})  # a set is not JSON
            with pytest.raises(InvalidEvent):
                await replay.publish("t", "e", 1, idempotency_key="")
            store.fail = StoreUnavailable("Redis went away")
            with pytest.raises(StoreUnavailable):
                await replay.publish("t", "e", 1)
            store.fail = StoreError("Redis refused it")
            with pytest.raises(StoreError):
                await replay.publish("t", "e", 1)
            # history_size=4: offsets 13..16 are retained
            await subscribe(tg, "recovered", 3, topic="t", epoch=epoch, offset=14)  # replays 15, 16
            await subscribe(tg, "trimmed", 5, topic="t", epoch=epoch, offset=5)  # replays 13..16
            await subscribe(tg, "epoch", 5, topic="t", epoch="another-epoch", offset=3)
            await subscribe(tg, "ahead", 5, topic="t", epoch=epoch, offset=99)
            await subscribe(tg, "rewind", 3, topic="t", rewind=2)  # not a resume: replays 15, 16
            # the event at offset 14 has another time than the client's: the offset was reused
            await subscribe(tg, "reused", 5, topic="t", epoch=epoch, offset=14, time=1)
            middle = parse((await scrape(app)).text)
            assert value(middle, "starlette_replay_connections_open") == 7
            assert value(middle, "starlette_replay_subscriptions") == 7
            assert value(middle, "starlette_replay_topics") == 1
            assert value(middle, "starlette_replay_frames_queued") == 0
            assert value(middle, "starlette_replay_ready") == 1

            slow = await subscribe(tg, "slow", 1, topic="s")
            slow.stalled = True
            for i in range(10):  # the first send hangs; past 8 queued live frames: 1013
                await replay.publish("s", "e", i)
            with anyio.fail_after(TIMEOUT):
                await slow.closed.wait()
            assert slow.closed_with is not None and slow.closed_with[0] == 1013
            for name, ws in sockets.items():
                if name != "slow":
                    ws.inbox_send.close()  # the client leaves: the connection ends, peer first
        for ws in sockets.values():
            ws.close_streams()
    with pytest.raises(NotRunning):
        await replay.publish("t", "e", 1)

    registry = CollectorRegistry()
    registry.register(replay.collector())
    final = parse(generate_latest(registry).decode())
    after = counters(final)
    moved = {key: v - before.get(key, 0.0) for key, v in after.items() if v != before.get(key, 0.0)}
    live = 16 + 10
    assert moved == dict(
        [
            c("starlette_replay_connections_opened_total", 8),
            c("starlette_replay_connections_closed_total", 7, code="peer"),
            c("starlette_replay_connections_closed_total", 1, code="1013"),
            c("starlette_replay_slow_consumer_closes_total", 1),
            # a: subscribed + 16; recovered 1 + 2; trimmed, epoch, ahead 1 + 4; rewind 1 + 2; reused 1 + 4;
            # slow: subscribed
            c("starlette_replay_frames_sent_total", 17 + 3 + 5 + 5 + 5 + 3 + 5 + 1),
            c("starlette_replay_publishes_total", live, outcome="ok"),
            c("starlette_replay_publishes_total", 3, outcome="invalid"),
            c("starlette_replay_publishes_total", 2, outcome="unavailable"),  # StoreUnavailable, NotRunning
            c("starlette_replay_publishes_total", 1, outcome="error"),
            c("starlette_replay_events_stored_total", live),
            c("starlette_replay_publish_seconds_bucket", live, le="+Inf"),
            c("starlette_replay_publish_seconds_count", live),
            c("starlette_replay_live_events_total", live),
            c("starlette_replay_deliver_lag_seconds_bucket", live // LAG_SAMPLE_EVERY, le="+Inf"),
            c("starlette_replay_deliver_lag_seconds_count", live // LAG_SAMPLE_EVERY),
            c("starlette_replay_replays_total", 6),
            c("starlette_replay_events_replayed_total", 2 + 4 + 4 + 4 + 2 + 4),
            c("starlette_replay_resumes_total", 1, outcome="recovered"),
            c("starlette_replay_resumes_total", 1, outcome="trimmed"),
            c("starlette_replay_resumes_total", 1, outcome="epoch"),
            c("starlette_replay_resumes_total", 1, outcome="ahead"),
            c("starlette_replay_resumes_total", 1, outcome="reused_offset"),
        ]
    )
    # and the gauges are back to nothing, the Replay stopped
    for gauge in ("connections_open", "subscriptions", "topics", "frames_queued", "ready"):
        assert value(final, f"starlette_replay_{gauge}") == 0, gauge


async def test_the_exposition_parses_as_prometheus_text_and_as_openmetrics() -> None:
    replay = Replay(authorize=allow_all)
    app = Starlette(routes=[replay.metrics_route("/metrics")])
    async with replay:
        await replay.publish("t", "e", 1)
        plain = await scrape(app)
        assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert plain.headers["cache-control"] == "no-store"
        families = {family.name: family for family in text_string_to_metric_families(plain.text)}
        assert families["starlette_replay_publishes"].type == "counter"
        assert families["starlette_replay_connections_open"].type == "gauge"
        assert families["starlette_replay_publish_seconds"].type == "histogram"
        assert all(name.startswith("starlette_replay_") for name in families)
        # no Redis figures for a MemoryStore
        assert not any(name.startswith("starlette_replay_redis_") for name in families)

        om = await scrape(app, accept="application/openmetrics-text; version=1.0.0")
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        parsed = {family.name: family for family in openmetrics_families(om.text)}
        assert set(parsed) == set(families)
        buckets = [s for s in parsed["starlette_replay_publish_seconds"].samples if s.name.endswith("_bucket")]
        assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1


def test_histogram_buckets_are_le_and_cumulative() -> None:
    hist = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        hist.observe(seconds)
    assert hist.counts == [2, 2, 1]  # a value equal to a bound is in that bound's bucket
    assert hist.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert hist.count == 5 and hist.sum == pytest.approx(4.65)


def test_the_counters_object_has_no_dict() -> None:
    # bumped on the hot path: attribute slots, no per-instance dict to grow
    assert not hasattr(Metrics(), "__dict__")


class ThreadRecordingStore(MemoryStore):
    """A MemoryStore that records the thread its health is read on (the collector reads it)."""

    def __init__(self) -> None:
        super().__init__()
        self.health_threads: list[int] = []

    def health(self) -> Health:
        self.health_threads.append(threading.get_ident())
        return super().health()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        body: bytes = response.read()
    return body.decode()


async def test_a_scrape_from_another_thread_reads_the_figures_on_the_event_loop_thread() -> None:
    # prometheus-client's own HTTP server scrapes from a thread of its own, while the
    # connections and queues the figures come from change on the event loop's thread.
    store = ThreadRecordingStore()
    replay = Replay(store, authorize=allow_all)
    async with replay:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(replay.collector())
        port = free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        try:
            await replay.publish("t", "e", 1)
            text = await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/metrics")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(TIMEOUT)
    assert value(parse(text), "starlette_replay_publishes_total", outcome="ok") == 1
    assert store.health_threads == [threading.get_ident()]


@asynccontextmanager
async def metrics_port(replay: Replay, ports: range) -> Any:
    """docs/operations.md's recipe for ``uvicorn --workers``: each worker serves its own
    metrics on the first free port of a range (kept in step with the docs)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(replay.collector())
    for port in ports:
        try:
            server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
            break
        except OSError:  # taken by another worker
            continue
    else:
        raise RuntimeError(f"no free metrics port in {ports}")
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


async def test_the_workers_recipe_gives_each_worker_a_port_of_its_own() -> None:
    first = free_port()
    ports = range(first, first + 3)
    one, two = Replay(authorize=allow_all), Replay(authorize=allow_all)
    async with one, two, metrics_port(one, ports) as port_one, metrics_port(two, ports) as port_two:
        assert port_one != port_two
        await one.publish("t", "e", 1)
        await two.publish_many("t", [("e", 1), ("e", 2)])
        texts = [
            await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/metrics") for port in (port_one, port_two)
        ]
    assert [value(parse(text), "starlette_replay_events_stored_total") for text in texts] == [1, 2]


class StoreWithoutHealth:
    """An EventStore with no ``health()`` (a third party's): it is taken as ready."""

    def __init__(self) -> None:
        inner = MemoryStore()
        for name in ("connect", "subscribe", "unsubscribe", "append", "read", "position"):
            setattr(self, name, getattr(inner, name))
        for name in ("load_cursor", "save_cursor", "aclose"):
            setattr(self, name, getattr(inner, name))


async def test_health_of_a_replay_by_store_and_lifecycle() -> None:
    replay = Replay(authorize=allow_all)
    app = Starlette(routes=[replay.health_route("/health")])

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
            with anyio.fail_after(TIMEOUT):
                return await http.get("/health")

    assert replay.health() == Health(False, {"replay": "not running"})
    response = await get()
    assert (response.status_code, response.json()) == (503, {"ready": False, "checks": {"replay": "not running"}})
    async with replay:
        # a MemoryStore is this process's memory: ready whenever the process answers
        assert replay.health() == Health(True, {"replay": "running", "store": "ok (in memory)"})
        response = await get()
        assert response.status_code == 200 and response.json()["ready"] is True
        assert response.headers["cache-control"] == "no-store"
    assert not replay.health().ready

    bare = StoreWithoutHealth()
    assert isinstance(bare, EventStore)
    other = Replay(bare, authorize=allow_all)  # type: ignore[arg-type]
    async with other:
        assert other.health() == Health(True, {"replay": "running", "store": "no health check"})


def test_without_prometheus_client_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client now fails
    replay = Replay()
    with pytest.raises(ImportError, match=r"pip install 'starlette-replay\[metrics\]'"):
        replay.metrics_route()
    with pytest.raises(ImportError, match=r"starlette-replay\[metrics\]"):
        replay.collector()
    assert replay.health().ready is False  # health needs nothing installed


async def test_frames_sent_is_what_the_socket_took_across_a_shutdown_with_events_in_flight() -> None:
    # Events queued for a woken writer and a shutdown in the same step: whoever sends
    # them (the writer's last turn, or the clean-up's flush before the close frame),
    # every frame the socket took is counted once, and nothing else.
    replay = Replay(authorize=allow_all)
    ws = FakeWebSocket()
    async with anyio.create_task_group() as tg:
        await replay.__aenter__()
        try:
            tg.start_soon(serve_fake, replay, ws, "flushed")
            await ws.client_sends({"type": "subscribe", "topic": "t"})
            await ws.wait_for(1)
            await replay.publish_many("t", [("e", i) for i in range(20)])  # delivered, not yet sent
        finally:
            await replay.aclose()  # aborts every connection before anything else runs
    ws.close_streams()
    assert ws.closed_with is not None and ws.closed_with[0] == 1001
    assert [frame.get("offset") for frame in ws.sent[1:]] == list(range(1, 21))
    registry = CollectorRegistry()
    registry.register(replay.collector())
    final = parse(generate_latest(registry).decode())
    assert value(final, "starlette_replay_frames_sent_total") == len(ws.sent) == 21
    assert value(final, "starlette_replay_connections_closed_total", code="1001") == 1
