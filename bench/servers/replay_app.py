"""Contenders "replay-memory" and "replay-redis": this library, default options.

``BENCH_STORE`` is ``memory`` or ``redis`` (then ``BENCH_REDIS_URL``, and
``BENCH_REDIS_CLUSTER=1`` when that URL names a node of a Redis Cluster: the
contender "replay-cluster", run by ``topics`` only). Besides
the library's own routes (``/ws``; ``/sse`` for the ``-sse`` contenders) and the shared trigger (``POST /publish``),
this server holds the baselines that need the same Redis data:

- ``POST /publish-bench?topic=T&n=M&c=C&mode=lib|raw-script|raw-xadd``: C
  concurrent publishers each publish M/C events to T, timed in the server.
  ``lib`` goes through ``replay.publish``; ``raw-script`` runs the library's own
  append script with redis-py (EVALSHA, same keys and arguments: the same Redis
  work without the library); ``raw-xadd`` is a pipelined XADD + PUBLISH.
- ``POST /publish-topics-bench?topic=P&topics=N&n=M&mode=lib|raw-pool|raw-pipeline``:
  N concurrent publishers, one per topic ``P-0`` .. ``P-(N-1)``, each publishes M
  events, timed in the server. Each measurement makes its own client and
  closes it after (so the Redis connections seen are its own). ``lib``: a new
  ``RedisStore.from_url`` and ``store.append(topic, [(type, raw)])``;
  ``raw-pool``: EVALSHA of the library's append script with redis-py over a
  ``BlockingConnectionPool(max_connections=50)``; ``raw-pipeline`` (the
  ceiling): the same EVALSHA on ONE connection, every topic's next append in
  one pipeline (``transaction=False``) per round.
- ``POST /publish-topics``: the shared topics trigger (bench/servers/_common.py).
- ``GET /metrics``: the library's metrics (``replay.metrics_route``), which
  ``bench.run --scrape`` scrapes every second.
- ``POST /tokens?topic=P&streams=N&rate=R&tokens=T&mode=token|coalesce``: N
  token streams at once, one per topic ``P-0`` .. ``P-(N-1)``, each producing
  T tokens open loop at R tokens/s (token i due at start + phase + i/R, the
  phase random in [0, 1/R) so that streams do not tick together). ``token``:
  each token is an event (``replay.publish``); ``coalesce``: through
  ``starlette_replay.streams.TokenStream`` (tokens that arrive while a publish
  is in flight share the next event). Event data: ``s`` (the event's index in
  its stream), ``t`` (its oldest token's due time), ``k`` (tokens in it),
  ``f`` (1 on the stream's last event), ``p`` (the text). Answers tokens and
  events published and the producers' lateness.
- ``WS /raw``: the catch-up baseline: after a first frame
  ``{"topic": T, "after": N}`` it reads the topic's stream with XRANGE pages of
  500 and sends each entry as an ``event`` frame, no library involved.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from _common import TOPIC_EVENT, data_for, drive, drive_topics, query_params, topics_params
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench._script import PREFIX, append_call, append_keys, append_script
from starlette_replay import MemoryStore, RedisStore, Replay, allow_all
from starlette_replay.streams import TokenStream

STORE = os.environ.get("BENCH_STORE", "memory")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "")
CLUSTER = os.environ.get("BENCH_REDIS_CLUSTER") == "1"

store = RedisStore.from_url(REDIS_URL, cluster=CLUSTER) if STORE == "redis" else MemoryStore()
replay = Replay(store, authorize=allow_all, allowed_origins=["*"])
raw_client: Any = None


@asynccontextmanager
async def lifespan(app: Starlette) -> Any:
    global raw_client
    async with replay:
        if REDIS_URL and not CLUSTER:  # the raw baselines run on one Redis only
            import redis.asyncio

            raw_client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            yield
        finally:
            if raw_client is not None:
                await raw_client.aclose()


async def publish(request: Request) -> JSONResponse:
    topic, n, rate = query_params(request.query_params)

    async def one(i: int, data: dict[str, Any]) -> None:
        await replay.publish(topic, TOPIC_EVENT, data)

    result = await drive(one, n, rate)
    position = await replay.position(topic)
    result.update(epoch=position.epoch, head=position.head)
    return JSONResponse(result)


async def publish_topics(request: Request) -> JSONResponse:
    topics, n = topics_params(request.query_params)

    async def one(topic: str, i: int, data: dict[str, Any]) -> None:
        await replay.publish(topic, TOPIC_EVENT, data)

    return JSONResponse(await drive_topics(one, topics, n))


async def publish_bench(request: Request) -> JSONResponse:
    q = request.query_params
    topic, n, concurrency, mode = q["topic"], int(q["n"]), int(q.get("c", "1")), q.get("mode", "lib")
    keys = append_keys(topic)
    channel = f"{PREFIX}:{{{topic}}}:live"

    if mode == "lib":

        async def one(i: int) -> None:
            await replay.publish(topic, TOPIC_EVENT, data_for(i, time.monotonic_ns()))

    elif mode == "raw-script":
        sha = await raw_client.script_load(append_script())  # the library's own script: the same Redis work

        async def one(i: int) -> None:
            raw = json.dumps(data_for(i, time.monotonic_ns()), separators=(",", ":"))
            # one segment: no idempotency key, one event
            await raw_client.evalsha(sha, *append_call(topic, TOPIC_EVENT, raw))

    elif mode == "raw-xadd":

        async def one(i: int) -> None:
            raw = json.dumps(data_for(i, time.monotonic_ns()), separators=(",", ":"))
            pipe = raw_client.pipeline(transaction=False)
            pipe.xadd(keys[1], {"t": TOPIC_EVENT, "d": raw}, maxlen=10_000, approximate=False)
            pipe.publish(channel, raw)
            await pipe.execute()

    else:
        return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)

    per_task = n // concurrency

    async def worker(w: int) -> None:
        for j in range(per_task):
            await one(w * per_task + j)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    seconds = time.perf_counter() - start
    total = per_task * concurrency
    return JSONResponse({"n": total, "c": concurrency, "mode": mode, "seconds": seconds, "rate": total / seconds})


def _raw(i: int) -> str:
    return json.dumps(data_for(i, time.monotonic_ns()), separators=(",", ":"))


async def publish_topics_bench(request: Request) -> JSONResponse:
    import redis.asyncio

    topics, n = topics_params(request.query_params)
    mode = request.query_params.get("mode", "lib")

    async def per_topic(one: Callable[[str, int], Awaitable[None]]) -> float:
        """Seconds for a publisher per topic, all at once, each calling ``one(topic, i)`` n times."""

        async def publisher(topic: str) -> None:
            for i in range(n):
                await one(topic, i)

        start = time.perf_counter()
        await asyncio.gather(*(publisher(topic) for topic in topics))
        return time.perf_counter() - start

    if mode == "lib":
        lib = RedisStore.from_url(REDIS_URL)

        async def append(topic: str, i: int) -> None:
            await lib.append(topic, [(TOPIC_EVENT, _raw(i))])

        try:
            seconds = await per_topic(append)
        finally:
            await lib.aclose()
    elif mode in ("raw-pool", "raw-pipeline"):
        pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=50 if mode == "raw-pool" else 1)
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            sha = await client.script_load(append_script())
            if mode == "raw-pool":

                async def evalsha(topic: str, i: int) -> None:
                    await client.evalsha(sha, *append_call(topic, TOPIC_EVENT, _raw(i)))

                seconds = await per_topic(evalsha)
            else:
                start = time.perf_counter()
                for i in range(n):  # a round: every topic's next append, one pipeline
                    pipe = client.pipeline(transaction=False)
                    for topic in topics:
                        pipe.evalsha(sha, *append_call(topic, TOPIC_EVENT, _raw(i)))
                    await pipe.execute()
                seconds = time.perf_counter() - start
        finally:
            await client.aclose()
            await pool.disconnect()
    else:
        return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)
    total = n * len(topics)
    return JSONResponse(
        {"topics": len(topics), "n": n, "events": total, "mode": mode, "seconds": seconds, "rate": total / seconds}
    )


async def raw_catchup(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        request = json.loads(await websocket.receive_text())
        topic, after = request["topic"], int(request.get("after", 0))
        log = append_keys(topic)[1]
        start = f"{after + 1}-0"
        while True:
            entries = await raw_client.xrange(log, min=start, max="+", count=500)
            if not entries:
                break
            for entry_id, fields in entries:
                offset = int(entry_id.split(b"-", 1)[0])
                frame = (
                    f'{{"type":"event","topic":"{topic}","offset":{offset},"event":"{fields[b"t"].decode()}",'
                    f'"data":{fields[b"d"].decode()},"time":{fields[b"ms"].decode()}}}'
                )
                await websocket.send_text(frame)
            start = f"({entry_id.decode()}"
        await websocket.receive_text()  # the client closes when it has everything
    except WebSocketDisconnect:
        pass


TOKEN_TEXT = "tok "


async def tokens_bench(request: Request) -> JSONResponse:
    q = request.query_params
    prefix, streams = str(q.get("topic", "bench")), int(q.get("streams", "1"))
    rate, per_stream, mode = float(q.get("rate", "30")), int(q.get("tokens", "300")), q.get("mode", "token")
    if mode not in ("token", "coalesce"):
        return JSONResponse({"error": f"unknown mode {mode!r}"}, status_code=400)
    step = 1e9 / rate
    events = 0
    late_ns: list[int] = []  # how late each producer started its tokens (the event loop's own lag)
    start = time.monotonic_ns()

    async def produce(index: int) -> None:
        nonlocal events
        topic = f"{prefix}-{index}"
        phase = random.random() * step
        if mode == "token":
            for i in range(per_stream):
                due = start + int(phase + i * step)
                delay = (due - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                late_ns.append(max(0, time.monotonic_ns() - due))
                data = {"s": i, "t": due, "k": 1, "f": int(i == per_stream - 1), "p": TOKEN_TEXT}
                await replay.publish(topic, "tok", data)
                events += 1
            return
        made = 0

        def make(tokens: Any, first: int) -> dict[str, Any]:
            nonlocal made
            made += 1
            last = int(first + len(tokens) == per_stream)
            return {"s": made - 1, "t": tokens[0], "k": len(tokens), "f": last, "p": TOKEN_TEXT * len(tokens)}

        async with TokenStream(replay, topic, "tok", make=make) as stream:
            for i in range(per_stream):
                due = start + int(phase + i * step)
                delay = (due - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                late_ns.append(max(0, time.monotonic_ns() - due))
                await stream.send(due)
        events += stream.events

    await asyncio.gather(*(produce(i) for i in range(streams)))
    seconds = (time.monotonic_ns() - start) / 1e9
    late_ns.sort()
    return JSONResponse(
        {
            "streams": streams,
            "tokens": streams * per_stream,
            "events": events,
            "seconds": seconds,
            "offered_rate": streams * rate,
            "producer_late_p99_ms": late_ns[int(0.99 * (len(late_ns) - 1))] / 1e6 if late_ns else 0.0,
        }
    )


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        replay.route("/ws"),
        replay.sse_route("/sse"),  # contenders replay-memory-sse and replay-redis-sse
        WebSocketRoute("/raw", raw_catchup),
        Route("/publish", publish, methods=["POST"]),
        Route("/publish-topics", publish_topics, methods=["POST"]),
        Route("/publish-bench", publish_bench, methods=["POST"]),
        Route("/publish-topics-bench", publish_topics_bench, methods=["POST"]),
        Route("/tokens", tokens_bench, methods=["POST"]),
        Route("/health", health),
        replay.metrics_route("/metrics"),  # bench.run --scrape
    ],
    lifespan=lifespan,
)
