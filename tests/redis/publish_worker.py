"""A process that only publishes (a worker): ``python -m tests.redis.publish_worker URL PREFIX TOPIC COUNT``.

It serves nothing; it prints ``epoch first last`` once every event is stored.
"""

from __future__ import annotations

import sys

import anyio

from starlette_replay import RedisStore, Replay


async def main(url: str, prefix: str, topic: str, count: int) -> None:
    async with Replay(RedisStore.from_url(url, prefix=prefix)) as replay:
        events = [await replay.publish(topic, "work", {"n": i}) for i in range(count)]
    sys.stdout.write(f"{events[0].epoch} {events[0].offset} {events[-1].offset}\n")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
