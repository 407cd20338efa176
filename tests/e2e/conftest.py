"""Fixtures of the end-to-end tests: uvicorn servers (see ``tests/servers.py``)."""

from __future__ import annotations

from tests.servers import pytest_runtest_makereport, uvicorn_servers

__all__ = ["pytest_runtest_makereport", "uvicorn_servers"]
