"""The library's append script and its call, for the raw redis-py baselines.

The baselines run the same Lua script as ``RedisStore`` with redis-py, so they
do the same Redis work without the library. Where the script comes from is in
``append_script()`` alone: when the library moves it, change that one function.

``append_call`` follows the script's header comment (``starlette_replay/stores/
redis/append.lua``) and ``RedisStore._store_batch``: KEYS meta, log,
idem, idemz of the topic (hash-tagged), ARGV new epoch, history_size, ttl ms,
channel, publish command (``PUBLISH``; ``SPUBLISH`` on a cluster), number of
segments, then per segment: idempotency key ('' none), n, type1, raw1, ...
Here: one segment of one event, no key, no TTL, the store's defaults (prefix ``replay``, history_size 10,000).
"""

from __future__ import annotations

import secrets
from typing import Any

__all__ = ["HISTORY_SIZE", "PREFIX", "append_call", "append_keys", "append_script"]

PREFIX = "replay"  # RedisStore's default prefix: the baselines use the same keys
HISTORY_SIZE = 10_000  # RedisStore's default history_size


def append_script() -> str:
    """The Lua source of the library's append script (the one thing to change when it moves)."""
    from starlette_replay.stores.redis._scripts import APPEND

    return APPEND.body


def append_keys(topic: str, prefix: str = PREFIX) -> list[str]:
    """KEYS of the append script for ``topic``: meta, log, idem, idemz."""
    base = f"{prefix}:{{{topic}}}:"
    return [base + "meta", base + "log", base + "idem", base + "idemz"]


def append_call(topic: str, event_type: str, raw: str, prefix: str = PREFIX) -> tuple[Any, ...]:
    """``numkeys, *KEYS, *ARGV`` of one append of one event (what follows the SHA in EVALSHA)."""
    channel = f"{prefix}:{{{topic}}}:live"
    argv = (secrets.token_hex(8), HISTORY_SIZE, 0, channel, "PUBLISH", 1, "", 1, event_type, raw)
    return (4, *append_keys(topic, prefix), *argv)
