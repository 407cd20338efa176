"""docs/sse.md's Python recipe, run for real against uvicorn: it resumes with the last id, across a drop."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

DOC = Path(__file__).resolve().parents[2] / "docs" / "sse.md"


def _recipe() -> types.ModuleType:
    match = re.search(r"<!-- sse-recipe -->\n```python\n(.*?)\n```", DOC.read_text(), re.DOTALL)
    assert match is not None, "docs/sse.md has no <!-- sse-recipe --> block"
    module = types.ModuleType("sse_recipe")
    exec(compile(match.group(1), str(DOC), "exec"), module.__dict__)
    return module


async def test_the_recipe_resumes_across_a_drop_and_stops_on_a_refusal(uvicorn_servers: ServerFactory) -> None:
    follow = _recipe().follow
    server = uvicorn_servers(env={"REPLAY_STORE": "memory"})
    frames: list[dict[str, Any]] = []
    wanted: tuple[str, int] = ("", 0)
    reached = anyio.Event()

    def count(kind: str) -> int:
        return sum(f["type"] == kind for f in frames)

    def handle(frame: dict[str, Any]) -> None:
        frames.append(frame)
        if count(wanted[0]) >= wanted[1]:
            reached.set()

    async def until(kind: str, n: int) -> None:
        nonlocal wanted, reached
        wanted, reached = (kind, n), anyio.Event()
        if count(kind) < n:
            await reached.wait()

    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http, anyio.create_task_group() as tg:
        with anyio.fail_after(30):
            tg.start_soon(follow, f"{server.http_url}/sse?identity=py", ["recipe-a", "recipe-b"], handle)
            await until("subscribed", 2)
            await http.post("/publish", json={"topic": "recipe-a", "count": 3})
            await until("event", 3)
            assert (await http.post("/revoke", params={"identity": "py"})).json()["closed"] == 1
            await http.post("/publish", json={"topic": "recipe-a", "count": 2})
            await http.post("/publish", json={"topic": "recipe-b", "count": 2})
            await until("event", 7)
            tg.cancel_scope.cancel()
    events = [(f["topic"], f["offset"]) for f in frames if f["type"] == "event"]
    assert events == [("recipe-a", n) for n in range(1, 6)] + [("recipe-b", 1), ("recipe-b", 2)]
    resumed = [f for f in frames if f["type"] == "subscribed"][2:]
    assert [(f["topic"], f["resumed"], f["recovered"], f["replayed"]) for f in resumed] == [
        ("recipe-a", True, True, 2),
        ("recipe-b", True, True, 2),
    ]

    with pytest.raises(RuntimeError, match="refused with 403"), anyio.fail_after(10):
        await follow(f"{server.http_url}/sse", ["forbidden-topic"], handle)
