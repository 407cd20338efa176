"""Fixtures for the Redis store tests: each test that breaks a server gets its own."""

from __future__ import annotations

from tests.redis.launcher import uvicorn_factory
from tests.redis_server import redis_server, redis_server_factory

__all__ = ["redis_server", "redis_server_factory", "uvicorn_factory"]
