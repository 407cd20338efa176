"""SSE in a real Chromium: the native ``EventSource`` with no library, and replay.js with ``transport: "sse"``.

Each page reads two topics from one stream while a publisher keeps going; the
server drops the stream mid-way (``replay.revoke`` of the page's identity: its
streams end, and this app's ``identify`` accepts the identity again) and the
page resumes by itself. Nothing is lost and nothing is doubled. Every wait is on
the page's state or on the server, never on a sleep.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from playwright.async_api import Browser, Page

from tests.e2e.client import wait_for_stats
from tests.servers import ServerFactory, UvicornServer, uvicorn_servers

__all__ = ["uvicorn_servers"]

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

TOPICS = ["page-a", "page-b"]
WAIT_MS = 20_000


async def _page(browser: Browser, server: UvicornServer) -> Page:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(server.http_url + "/health")  # a page of the same origin
    return page


async def _wait_for(page: Page, heads: dict[str, int]) -> None:
    await page.wait_for_function(
        "(heads) => Object.entries(heads).every(([t, h]) => (window.got[t] || []).length >= h)",
        arg=heads,
        timeout=WAIT_MS,
    )


async def _publish_rounds(http: httpx.AsyncClient, rounds: int) -> dict[str, int]:
    last: dict[str, int] = {}
    for _ in range(rounds):
        for topic in TOPICS:
            response = await http.post("/publish", json={"topic": topic, "count": 3})
            last[topic] = response.json()["last"]
    return last


async def _drop_mid_stream(page: Page, http: httpx.AsyncClient, identity: str) -> dict[str, int]:
    """Publish, drop the page's stream, publish while it is away, publish after it is back."""
    await _publish_rounds(http, 3)
    await _wait_for(page, dict.fromkeys(TOPICS, 9))
    connects = await page.evaluate("window.opens")
    assert (await http.post("/revoke", params={"identity": identity})).json()["closed"] == 1
    await _publish_rounds(http, 2)  # while the page is away (or reconnecting)
    await page.wait_for_function("(n) => window.opens > n", arg=connects, timeout=WAIT_MS)
    return await _publish_rounds(http, 2)


async def _leave(page: Page, server: UvicornServer) -> None:
    """Close the page and wait until the server saw its stream end (uvicorn waits for open streams at shutdown)."""
    await page.close()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        await wait_for_stats(http, lambda stats: stats["connections"] == 0)


def _assert_exact(got: dict[str, list[int]], heads: dict[str, int]) -> None:
    for topic, head in heads.items():
        assert got[topic] == list(range(1, head + 1)), (topic, got[topic])


async def test_native_event_source_resumes_by_itself(browser: Browser, uvicorn_servers: ServerFactory) -> None:
    server = uvicorn_servers(env={"REPLAY_STORE": "memory", "REPLAY_SSE_RETRY": 200})
    page = await _page(browser, server)
    # No library: EventSource keeps the last id and sends it as Last-Event-ID when it reconnects.
    await page.evaluate(
        """(topics) => {
            window.got = {}; window.opens = 0; window.ids = [];
            const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&");
            const source = new EventSource("/sse?" + query + "&identity=native");
            source.onopen = () => { window.opens += 1; };
            source.onmessage = (message) => {
                const frame = JSON.parse(message.data);
                window.ids.push(message.lastEventId);
                if (frame.type === "event") (window.got[frame.topic] ||= []).push(frame.offset);
            };
        }""",
        TOPICS,
    )
    await page.wait_for_function("window.opens === 1", timeout=WAIT_MS)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(60):
            heads = await _drop_mid_stream(page, http, "native")
            await _wait_for(page, heads)
    got: dict[str, Any] = await page.evaluate("window.got")
    _assert_exact(got, heads)
    ids: list[str] = await page.evaluate("window.ids")
    assert ids[-1].count(",") == 1 and all(":" in entry for entry in ids[-1].split(","))
    await _leave(page, server)


async def test_replay_js_over_sse_resumes_without_loss_or_doubles(
    browser: Browser, uvicorn_servers: ServerFactory
) -> None:
    server = uvicorn_servers(env={"REPLAY_STORE": "memory"})
    page = await _page(browser, server)
    await page.evaluate(
        """async (topics) => {
            const { ReplayClient } = await import("/replay.js");
            window.got = {}; window.opens = 0; window.gaps = 0;
            const client = new ReplayClient("/sse?identity=js", { transport: "sse", backoff: { initial: 100 } });
            client.on("state", ({ state }) => { if (state === "open") window.opens += 1; });
            window.client = client;
            for (const topic of topics) {
                client.subscribe(topic, {
                    onEvent: (e) => (window.got[e.topic] ||= []).push(e.offset),
                    onGap: () => { window.gaps += 1; },
                });
            }
        }""",
        TOPICS,
    )
    await page.wait_for_function("window.opens === 1", timeout=WAIT_MS)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10.0) as http:
        with anyio.fail_after(60):
            heads = await _drop_mid_stream(page, http, "js")
            await _wait_for(page, heads)
            # Subscribing to one more topic reopens the one stream with all three.
            await page.evaluate(
                "() => window.client.subscribe('page-c', { rewind: 5, "
                "onEvent: (e) => (window.got[e.topic] ||= []).push(e.offset) })"
            )
            await http.post("/publish", json={"topic": "page-c", "count": 7})
            await _wait_for(page, {"page-c": 5})
            stats = (await http.get("/stats")).json()
            assert (stats["connections"], stats["subscriptions"]) == (1, 3)
    got: dict[str, Any] = await page.evaluate("window.got")
    _assert_exact({t: got[t] for t in TOPICS}, heads)
    assert got["page-c"][-1] == 7 and got["page-c"] == sorted(set(got["page-c"]))
    assert await page.evaluate("window.gaps") == 0
    assert await page.evaluate("window.client.stats.duplicates") == 0
    await _leave(page, server)
