"""The demo app: a chat with an agent whose answers survive dropped connections.

``python -m example_app`` serves it; :func:`create_app` builds it (tests use it too).
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
