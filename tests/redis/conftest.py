"""Fixtures for the Redis store tests: redis-servers (tests/redis_server.py), Redis Clusters
(tests/redis_cluster.py), uvicorn processes (tests/servers.py)."""

from __future__ import annotations

from tests.redis_cluster import redis_cluster, redis_cluster_factory
from tests.redis_server import redis_server, redis_server_factory
from tests.servers import pytest_runtest_makereport, uvicorn_servers

__all__ = [
    "pytest_runtest_makereport",
    "redis_cluster",
    "redis_cluster_factory",
    "redis_server",
    "redis_server_factory",
    "uvicorn_servers",
]
