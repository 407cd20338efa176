"""The Redis event store (Streams for history, pub/sub for live fan-out).

Placeholder until the Redis store lands: importing works without redis-py,
constructing one raises.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RedisStore"]


class RedisStore:
    """Not implemented yet (tracked by the Redis store issue)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("RedisStore is not implemented yet")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStore:
        return cls(url, **kwargs)
