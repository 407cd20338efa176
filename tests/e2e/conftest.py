"""Fixtures of the end-to-end tests: uvicorn servers (see ``tests/servers.py``), and the store they run on."""

from __future__ import annotations

import itertools

import pytest

from tests.redis_server import RedisServer, redis_server
from tests.servers import pytest_runtest_makereport, uvicorn_servers

__all__ = ["pytest_runtest_makereport", "redis_server", "store_env", "uvicorn_servers"]

_prefixes = itertools.count()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Server environment for the store under test: the memory store, or Redis under a key prefix of its own.

    Tests that take this fixture run once per store: the guarantees are the same on both.
    """
    if request.param == "memory":
        return {"REPLAY_STORE": "memory"}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {
        "REPLAY_STORE": "redis",
        "REPLAY_REDIS_URL": server.url,
        "REPLAY_REDIS_PREFIX": f"e2e{next(_prefixes)}-{request.node.name}".replace("[", "-").replace("]", ""),
    }
