"""History trimmed under a replay: the client is told (1013, then `recovered: false`), never silently short.

A tiny history, slow store reads and fast publishing: a resume from an old
cursor finds its history trimmed while it replays. The protocol allows the
server two answers, both checked here: close with 1013 (the client resumes) or,
on the resume, ``recovered: false`` with everything still retained. A client
may lose events only right after a ``recovered: false``, and never gets one
twice.
"""

from __future__ import annotations

import itertools

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.client import Subscriber, abort_all
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPIC = "trim"
HISTORY = 40
PUMPED = 300


async def laggard(client: Subscriber, final: int) -> None:
    while client.offset(TOPIC) < final:
        await client.connect()
        try:
            await client.read_until({TOPIC: final})
        except ConnectionClosed:
            continue
        await client.drop()


async def test_history_trimmed_during_replay_is_signalled_not_skipped(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_HISTORY_SIZE": HISTORY, "REPLAY_READ_DELAY": 0.02, "REPLAY_PAGE_SIZE": 5})
    clients = [Subscriber(server.ws_url(), [TOPIC], name=f"laggard{n}", expect_recovered=False) for n in range(4)]
    try:
        with anyio.fail_after(40):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=30.0) as http:
                first = (await http.post("/publish", json={"topic": TOPIC, "count": HISTORY, "batch": True})).json()
                for client in clients:
                    client.cursors[TOPIC] = (first["epoch"], 0)
                pump = (await http.post("/pump", json={"topics": [TOPIC], "count": PUMPED, "interval": 0.002})).json()
                async with anyio.create_task_group() as tg:
                    for client in clients:
                        tg.start_soon(laggard, client, HISTORY + PUMPED)
                    published = (await http.post(f"/pump/{pump['id']}/wait")).json()
                assert published[TOPIC]["last"] == HISTORY + PUMPED
    finally:
        abort_all(clients)

    problems: list[str] = []
    for client in clients:
        problems += client.violations
        offsets = client.offsets(TOPIC)
        if offsets != sorted(set(offsets)):
            problems.append(f"{client.name}: a duplicate or out of order")
        # Each hole in what it got must follow a `recovered: false` resume (the client's checks allow a
        # jump only there); count them against the number of such resumes.
        holes = sum(1 for a, b in itertools.pairwise(offsets) if b != a + 1)
        unrecovered = sum(1 for f in client.subscribed_frames if f.resumed and not f.recovered)
        if holes > unrecovered:
            problems.append(f"{client.name}: {holes} holes but only {unrecovered} unrecovered resumes")
        closes = {code for code, _ in client.server_closes}
        if closes - {1013}:
            problems.append(f"{client.name}: closed with {closes}")
    assert not problems, "\n".join(problems)
    print(
        "closes:",
        [len(c.server_closes) for c in clients],
        "unrecovered resumes:",
        [sum(1 for f in c.subscribed_frames if f.resumed and not f.recovered) for c in clients],
    )
