"""What every benchmark server shares: the payload and the publish loop.

Standard library only: this module is imported by servers that run in other
virtualenvs (broadcaster, python-socketio), each with ``--app-dir bench/servers``.

The trigger is the same for every contender: ``POST /publish?topic=T&n=M&rate=R``
makes the server publish M events in one loop (awaiting each publish), either as
fast as it can (``rate=0``) or open-loop at R events/s. Each event's data is
``{"s": i, "t": <time.monotonic_ns() the event was due>, "p": "<padding>"}``:
the lean client reads ``s`` (for gaps and duplicates) and ``t`` (for latency) by
slicing, without a JSON parser. CLOCK_MONOTONIC is shared by every process on
one Linux machine, so client and server timestamps compare directly.

The topics trigger, ``POST /publish-topics?topic=P&topics=N&n=M``, starts N
publishers at once (``asyncio.gather``), one per topic ``P-0`` .. ``P-(N-1)``
(``topic_name``), each publishing M events back to back to its own topic.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["PAD", "TOPIC_EVENT", "data_for", "drive", "drive_topics", "query_params", "topic_name", "topics_params"]

TOPIC_EVENT = "tick"
# With the library's envelope ({"type":"event","topic":"b-xxxxxxxx","offset":..,...})
# the frames are about 256 bytes.
PAD = "x" * int(os.environ.get("BENCH_PAD", "120"))


def data_for(i: int, due_ns: int) -> dict[str, Any]:
    return {"s": i, "t": due_ns, "p": PAD}


def query_params(query: Any) -> tuple[str, int, float]:
    topic = str(query.get("topic", "bench"))
    n = int(query.get("n", "1000"))
    rate = float(query.get("rate", "0"))
    return topic, n, rate


async def drive(publish: Callable[[int, dict[str, Any]], Awaitable[Any]], n: int, rate: float) -> dict[str, Any]:
    """Publish events 0..n-1 through ``publish`` and return timing figures.

    ``rate`` 0: back to back. Otherwise open loop: event i is due at
    start + i/rate and carries its due time (a late publisher shows as latency,
    not as a slower schedule).
    """
    start = time.monotonic_ns()
    if rate <= 0:
        for i in range(n):
            await publish(i, data_for(i, time.monotonic_ns()))
    else:
        step = 1e9 / rate
        for i in range(n):
            due = start + int(i * step)
            delay = (due - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            await publish(i, data_for(i, due))
    seconds = (time.monotonic_ns() - start) / 1e9
    return {"n": n, "seconds": seconds, "rate": n / seconds if seconds > 0 else 0.0}


def topic_name(prefix: str, i: int) -> str:
    """The i-th topic of a topics run (the lean client subscribes connection i to it)."""
    return f"{prefix}-{i}"


def topics_params(query: Any) -> tuple[list[str], int]:
    prefix = str(query.get("topic", "bench"))
    count = int(query.get("topics", "1"))
    n = int(query.get("n", "100"))
    return [topic_name(prefix, i) for i in range(count)], n


async def drive_topics(
    publish: Callable[[str, int, dict[str, Any]], Awaitable[Any]], topics: list[str], n: int
) -> dict[str, Any]:
    """One publisher per topic, all started at once: each publishes events 0..n-1
    to its own topic through ``publish(topic, i, data)``, back to back."""

    async def publisher(topic: str) -> None:
        for i in range(n):
            await publish(topic, i, data_for(i, time.monotonic_ns()))

    start = time.monotonic_ns()
    await asyncio.gather(*(publisher(topic) for topic in topics))
    seconds = (time.monotonic_ns() - start) / 1e9
    total = n * len(topics)
    return {
        "topics": len(topics),
        "n": n,
        "events": total,
        "seconds": seconds,
        "rate": total / seconds if seconds > 0 else 0.0,
    }
