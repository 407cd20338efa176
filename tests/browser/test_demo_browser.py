"""The demo in a real browser: an answer published while the page is offline arrives exactly once,
and an answer streamed token by token continues at the exact token after a drop or a reload.

Every wait is on the DOM (selectors with timeouts) or on a frame from the
server, never on a sleep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page
from websockets.asyncio.client import connect

from example_app.app import plan_answer, split_tokens

from .conftest import DemoServer

pytestmark = pytest.mark.anyio

MESSAGE = "Euljiro, 2 people, tomorrow at 12:30"
ANSWER = plan_answer(MESSAGE)[1]
TOKENS = split_tokens(ANSWER)
WAIT_MS = 20_000


async def watch_topic(server: DemoServer, uid: str, until: Any) -> dict[str, Any]:
    """Watch the user's topic as a second client until ``until(frame)``; returns that event frame."""
    url = server.url.replace("http://", "ws://") + "/ws"
    async with connect(url, subprotocols=["replay.v1"], additional_headers={"Cookie": f"uid={uid}"}) as ws:
        await ws.send(json.dumps({"type": "subscribe", "topic": f"user:{uid}", "rewind": 1000}))
        async for raw in ws:
            frame = json.loads(raw)
            assert frame["type"] != "error", frame
            if frame["type"] == "event" and until(frame):
                return dict(frame)
    raise AssertionError("socket closed before the awaited event")


def is_final(frame: dict[str, Any]) -> bool:
    return frame["event"] == "task_interaction" and frame["data"]["state"] in ("done", "stopped")


async def wait_for_answer(server: DemoServer, uid: str) -> dict[str, Any]:
    """Watch the user's topic as a second client until the agent's final answer is stored."""
    return await watch_topic(server, uid, is_final)


async def dom_state(page: Page) -> dict[str, Any]:
    return dict(
        await page.evaluate(
            """() => ({
                offsets: [...document.querySelectorAll("[data-offset]")].map((el) => Number(el.dataset.offset)),
                users: [...document.querySelectorAll("#messages .msg.user")].map((el) => el.firstChild.textContent),
                pending: document.querySelectorAll("#messages .pending").length,
                answers: [...document.querySelectorAll("#messages .msg.agent.done")].map(
                    (el) => el.firstChild.textContent),
                stopped: [...document.querySelectorAll("#messages .msg.agent.stopped")].map(
                    (el) => el.firstChild.textContent),
                tokens: [...document.querySelectorAll("#messages .answer .tok")].map((el) => el.textContent),
                streaming: document.querySelectorAll("#messages .answer.streaming").length,
                mismatched: document.querySelectorAll("#messages .answer.mismatch").length,
                working: document.querySelectorAll("#messages .msg.agent.working").length,
                logs: document.querySelectorAll("#log .log-line").length,
            })"""
        )
    )


def assert_contiguous(state: dict[str, Any]) -> None:
    offsets = sorted(state["offsets"])
    assert offsets == list(range(1, len(offsets) + 1)), f"every event once, no gap: {state['offsets']}"


def assert_exactly_once(state: dict[str, Any]) -> None:
    assert_contiguous(state)
    assert state["users"] == [MESSAGE]
    assert state["pending"] == 0
    assert len(state["answers"]) == 1, state["answers"]
    assert state["answers"][0] == ANSWER
    assert state["tokens"] == TOKENS, "every token once, in order"
    assert (state["streaming"], state["mismatched"]) == (0, 0)
    assert state["working"] == 1
    assert state["logs"] == 4
    # user_message, working, 4 log lines, the start marker, the tokens, the final marker
    assert len(state["offsets"]) == 8 + len(TOKENS)


async def tokens_shown(page: Page, count: int) -> None:
    await page.wait_for_function(
        f"document.querySelectorAll('#messages .answer .tok').length >= {count}", timeout=WAIT_MS
    )


async def open_page(
    browser: Browser, server: DemoServer, transport: str = "websocket"
) -> tuple[BrowserContext, Page, list[str]]:
    """A fresh browser context on the demo page, connected over ``transport`` ("websocket" or "sse", the page's
    switch); the list collects page errors and console errors."""
    context = await browser.new_context(viewport={"width": 1100, "height": 720})
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            problems.append(f"console.{msg.type}: {msg.text}")

    page.on("console", on_console)
    await page.goto(server.url + ("/?transport=sse" if transport == "sse" else ""))
    await page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
    await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
    assert await page.evaluate("document.body.dataset.transport") == transport
    return context, page, problems


async def send_and_wait_for_answer(page: Page, count: int = 1) -> None:
    await page.fill("#text", MESSAGE)
    await page.click("#send")
    await page.wait_for_function(
        f"document.querySelectorAll('#messages .msg.agent.done').length >= {count}", timeout=WAIT_MS
    )


async def test_answer_published_while_offline_arrives_once(
    browser: Browser, demo_server: DemoServer, tmp_path: Path
) -> None:
    with anyio.fail_after(90):
        context, page, problems = await open_page(browser, demo_server)
        (cookie,) = [c for c in await context.cookies() if c["name"] == "uid"]

        # Cut the socket first, then write: the whole answer is published while offline.
        await page.click("#drop")
        await page.wait_for_selector("#status[data-state=closed]", timeout=WAIT_MS)
        await page.fill("#text", MESSAGE)
        await page.click("#send")
        answer = await wait_for_answer(demo_server, cookie["value"])
        offline = await dom_state(page)
        assert offline["answers"] == [] and offline["logs"] == 0, offline
        assert offline["pending"] == 1, "the page shows its message as sending until the stored event arrives"
        await page.screenshot(path=str(tmp_path / "1-offline.png"))

        await page.click("#reconnect")
        await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
        await page.wait_for_selector("#messages .msg.agent.done", timeout=WAIT_MS)
        await page.wait_for_function(
            f"document.querySelectorAll('[data-offset]').length >= {answer['offset']}", timeout=WAIT_MS
        )
        state = await dom_state(page)
        assert_exactly_once(state)
        assert state["answers"] == [answer["data"]["text"]]
        await page.screenshot(path=str(tmp_path / "2-reconnected.png"))

        # A reload rebuilds the page from the snapshot and resumes after it: nothing twice.
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
        await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
        await page.wait_for_selector("#messages .msg.agent.done", timeout=WAIT_MS)
        assert_exactly_once(await dom_state(page))
        await page.screenshot(path=str(tmp_path / "3-reloaded.png"), full_page=True)

        assert problems == []
        await context.close()


async def test_server_restart_with_lost_history_is_reported_as_a_gap(
    browser: Browser, demo_server: DemoServer, tmp_path: Path
) -> None:
    """uvicorn closes with 1012 on shutdown: the page reconnects by itself. The new process has a new
    memory store (a new epoch), so the resumed subscription is not recovered and the page says so."""
    with anyio.fail_after(120):
        context, page, problems = await open_page(browser, demo_server)
        await send_and_wait_for_answer(page)
        assert_exactly_once(await dom_state(page))

        await anyio.to_thread.run_sync(demo_server.restart)
        await page.wait_for_selector("#notice:not([hidden])", timeout=WAIT_MS)
        await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
        assert "history was reset" in await page.inner_text("#notice")
        assert await page.evaluate("window.demo.client.stats.connects") >= 2
        emptied = await dom_state(page)
        assert emptied["offsets"] == [], "the new epoch has no events; the old view was cleared"

        await send_and_wait_for_answer(page)
        assert_exactly_once(await dom_state(page))
        await page.screenshot(path=str(tmp_path / "after-restart.png"))
        assert [p for p in problems if p.startswith("pageerror")] == []
        await context.close()


async def test_silent_socket_is_detected_by_the_heartbeat(
    browser: Browser, quiet_server: DemoServer, tmp_path: Path
) -> None:
    """A frozen server keeps the TCP connection open and sends nothing (a dead network path looks the
    same): the page gives up on the socket after twice the heartbeat interval, and reconnects once the
    server answers again."""
    with anyio.fail_after(120):
        context, page, problems = await open_page(browser, quiet_server)
        quiet_server.pause()
        try:
            await page.wait_for_selector("#status[data-state=reconnecting]", timeout=WAIT_MS)
        finally:
            quiet_server.resume()
        await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
        assert await page.evaluate("window.demo.client.stats.connects") >= 2
        await send_and_wait_for_answer(page)
        assert_exactly_once(await dom_state(page))
        assert [p for p in problems if p.startswith("pageerror")] == []
        await context.close()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_dropped_connection_mid_answer_continues_at_the_exact_token(
    browser: Browser, stream_server: DemoServer, tmp_path: Path, transport: str
) -> None:
    """The socket goes down after a few tokens; the agent goes on (a disconnect never stops it); the page
    reconnects while the answer is still streaming and shows every token once, in order, then the end."""
    with anyio.fail_after(90):
        context, page, problems = await open_page(browser, stream_server, transport)
        (cookie,) = [c for c in await context.cookies() if c["name"] == "uid"]
        await page.fill("#text", MESSAGE)
        await page.click("#send")
        await tokens_shown(page, 3)
        await page.click("#drop")
        await page.wait_for_selector("#status[data-state=closed]", timeout=WAIT_MS)
        offline = await dom_state(page)
        # tokens keep being stored while the page is offline
        later = await watch_topic(
            stream_server,
            cookie["value"],
            lambda f: f["event"] == "answer_delta" and f["data"]["seq"] >= len(offline["tokens"]) + 3,
        )
        assert (await dom_state(page))["tokens"] == offline["tokens"], "nothing arrives while offline"
        assert offline["streaming"] == 1
        await page.screenshot(path=str(tmp_path / "1-offline-mid-answer.png"))

        await page.click("#reconnect")
        await page.wait_for_selector("#status[data-state=open]", timeout=WAIT_MS)
        await tokens_shown(page, later["data"]["seq"] + 1)
        mid = await dom_state(page)
        assert mid["tokens"] == TOKENS[: len(mid["tokens"])], "the replayed tokens continue the shown ones"
        await page.screenshot(path=str(tmp_path / "2-resumed-mid-answer.png"))
        await page.wait_for_selector("#messages .answer.done", timeout=WAIT_MS)
        assert_exactly_once(await dom_state(page))
        assert problems == []
        await context.close()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_reload_mid_answer_renders_the_partial_answer_and_continues(
    browser: Browser, stream_server: DemoServer, tmp_path: Path, transport: str
) -> None:
    with anyio.fail_after(90):
        context, page, problems = await open_page(browser, stream_server, transport)
        await page.fill("#text", MESSAGE)
        await page.click("#send")
        await tokens_shown(page, 3)
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
        partial = await dom_state(page)
        assert partial["streaming"] == 1, "the snapshot holds the start marker and the tokens so far"
        assert 3 <= len(partial["tokens"]) < len(TOKENS)
        assert partial["tokens"] == TOKENS[: len(partial["tokens"])]
        await page.screenshot(path=str(tmp_path / "reloaded-mid-answer.png"))
        await page.wait_for_selector("#messages .answer.done", timeout=WAIT_MS)
        assert_exactly_once(await dom_state(page))
        assert problems == []
        await context.close()


async def test_stop_stops_the_agent_even_while_the_page_is_offline(
    browser: Browser, stream_server: DemoServer, tmp_path: Path
) -> None:
    """Stop is a message to the agent (an HTTP request that stores a stop_requested event), so it works
    with the socket down; the answer ends "stopped" with exactly the tokens that were streamed."""
    with anyio.fail_after(90):
        context, page, problems = await open_page(browser, stream_server)
        (cookie,) = [c for c in await context.cookies() if c["name"] == "uid"]
        await page.fill("#text", MESSAGE)
        await page.click("#send")
        await tokens_shown(page, 3)
        await page.click("#drop")
        await page.wait_for_selector("#status[data-state=closed]", timeout=WAIT_MS)
        await page.click("#messages .answer .stop")
        final = await wait_for_answer(stream_server, cookie["value"])
        assert final["data"]["state"] == "stopped"
        assert 3 <= final["data"]["tokens"] < len(TOKENS)

        await page.click("#reconnect")
        await page.wait_for_selector("#messages .answer.stopped", timeout=WAIT_MS)
        state = await dom_state(page)
        assert_contiguous(state)
        assert state["stopped"] == [final["data"]["text"]]
        assert state["tokens"] == TOKENS[: final["data"]["tokens"]]
        assert (state["answers"], state["streaming"], state["mismatched"]) == ([], 0, 0)
        assert await page.locator("#messages .answer .stop").count() == 0
        await page.screenshot(path=str(tmp_path / "stopped.png"))
        assert problems == []
        await context.close()
