"""The route mounted in a FastAPI app under uvicorn; publishing from async and sync (threaded) handlers."""

from __future__ import annotations

import anyio
import httpx
import pytest

from starlette_replay.protocol import Subscribed
from tests.e2e.client import Subscriber, abort_all, assert_exact
from tests.servers import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_fastapi_async_and_sync_publishers_reach_a_subscriber_in_order(uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(app="tests.e2e.apps:make_fastapi_app")
    client = Subscriber(server.ws_url(), ["user:42"], name="fastapi")
    try:
        with anyio.fail_after(20):
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
                await client.connect()
                assert isinstance(await client.recv(), Subscribed)
                offsets = []
                for n in range(6):
                    path = "/fastapi/publish" if n % 2 else "/fastapi/publish-sync"
                    response = await http.post(path, params={"topic": "user:42", "tag": str(n)})
                    response.raise_for_status()
                    offsets.append(response.json()["offset"])
                assert offsets == [1, 2, 3, 4, 5, 6]
                epoch = response.json()["epoch"]
                await client.read_until({"user:42": 6})
                await client.drop()
    finally:
        abort_all([client])
    assert_exact([client], {"user:42": (epoch, 6)})
    assert [(d.data["tag"], d.data["via"]) for d in client.delivered["user:42"]] == [
        (str(n), "async" if n % 2 else "sync") for n in range(6)
    ]
