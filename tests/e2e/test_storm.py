"""A reconnect storm: clients drop and resume at random while events are published steadily.

The seed is printed (and in every failure message); rerun one with
``E2E_SEED=<seed> pytest tests/e2e/test_storm.py``.
"""

from __future__ import annotations

import os
import random

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Subscriber, abort_all, assert_exact, wait_for_stats
from tests.servers import ServerFactory, UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPICS = [f"storm:{n}" for n in range(4)]
CLIENTS = 12
ROUNDS = 250  # events per topic
INTERVAL = 0.008  # seconds between rounds: ~2-3 s of publishing


async def storm_client(client: Subscriber, rng: random.Random, publishing: anyio.Event) -> int:
    """Connect, read a few frames, drop (cleanly, dead, or with a re-subscribe first), again, until publishing ends.

    Returns the number of connections made.
    """
    while publishing.is_set() is False:
        await client.connect()
        frames = rng.randint(0, 60)
        try:
            with anyio.move_on_after(rng.uniform(0.02, 0.4)):
                for n in range(frames):
                    await client.recv()
                    if n == frames // 2 and rng.random() < 0.3:
                        # Repair-style re-subscribe on the same connection: replaces the subscription.
                        await client.subscribe(rng.choice(client.topics))
        except ConnectionClosed:
            pass  # asserted afterwards: the server must not close anyone here
        await client.drop(abort=rng.random() < 0.5)
    return len(client.connections)


async def test_reconnect_storm_loses_and_duplicates_nothing(
    uvicorn_servers: ServerFactory, store_env: dict[str, str]
) -> None:
    seed = int(os.environ.get("E2E_SEED") or random.randrange(2**32))
    print(f"reconnect storm seed: {seed}")
    rng = random.Random(seed)
    # Slightly slowed store reads: a resume's replay overlaps live publishing, so hand-offs merge buffers.
    server: UvicornServer = uvicorn_servers(env={**store_env, "REPLAY_READ_DELAY": 0.005, "REPLAY_PAGE_SIZE": 10})
    clients = [
        Subscriber(server.ws_url(), sorted(rng.sample(TOPICS, 2)), name=f"c{n}", rewind=1_000_000)
        for n in range(CLIENTS)
    ]
    client_rngs = [random.Random(rng.random()) for _ in clients]
    publishing_done = anyio.Event()

    try:
        with anyio.fail_after(40):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
                async with anyio.create_task_group() as tg:
                    for client, client_rng in zip(clients, client_rngs, strict=True):
                        tg.start_soon(storm_client, client, client_rng, publishing_done)
                    pump = (
                        await http.post("/pump", json={"topics": TOPICS, "count": ROUNDS, "interval": INTERVAL})
                    ).json()
                    published = (await http.post(f"/pump/{pump['id']}/wait")).json()
                    publishing_done.set()
                assert "error" not in published, published
                targets = {topic: (published[topic]["epoch"], published[topic]["last"]) for topic in TOPICS}
                assert all(last == ROUNDS for _, last in targets.values())

                # Everyone comes back one last time and catches up.
                async def final(client: Subscriber) -> None:
                    await client.connect()
                    await client.read_until({topic: targets[topic][1] for topic in client.topics})
                    await client.drop()

                async with anyio.create_task_group() as tg:
                    for client in clients:
                        tg.start_soon(final, client)
                stats = await wait_for_stats(http, lambda stats: stats["connections"] == 0)
    finally:
        abort_all(clients)

    context = f"(seed {seed})"
    assert_exact(clients, targets)
    for client in clients:
        for topic in client.topics:
            assert [d.data["i"] for d in client.delivered[topic]] == list(range(ROUNDS)), context
        assert client.server_closes == [], f"{client.name} closed by the server {context}"
    connections = sum(len(c.connections) for c in clients)
    resumes = [f for c in clients for f in c.subscribed_frames if f.resumed]
    replayed = sum(f.replayed for f in resumes)
    print(
        f"{connections} connections, {len(resumes)} resumes replaying {replayed} events, "
        f"{sum(c.ignored for c in clients)} events of replaced subscriptions ignored"
    )
    assert replayed > 0, f"no resume replayed anything: the storm tested nothing {context}"
    assert connections >= 2 * CLIENTS, f"the storm made only {connections} connections {context}"
    assert stats == {"connections": 0, "sse_streams": 0, "subscriptions": 0, "topics": 0, "queued_frames": 0}, context
