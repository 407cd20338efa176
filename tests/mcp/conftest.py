"""Fixtures for the MCP event store tests: uvicorn processes (tests/servers.py), redis-servers."""

from __future__ import annotations

from tests.redis_server import redis_server
from tests.servers import pytest_runtest_makereport, uvicorn_servers

__all__ = ["pytest_runtest_makereport", "redis_server", "uvicorn_servers"]
