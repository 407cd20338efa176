"""Backoff bounds, with the random source and the sleep injected: no real waiting."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from starlette.responses import PlainTextResponse

from starlette_replay.client import Backoff, ReplayClient

from .helpers import TIMEOUT, FakeServer, Peer, Script, serve, url

pytestmark = pytest.mark.anyio


def test_caps_grow_by_the_multiplier_up_to_max() -> None:
    backoff = Backoff(initial=0.5, max=5.0, multiplier=3.0)
    assert [backoff.cap(n) for n in range(5)] == [0.5, 1.5, 4.5, 5.0, 5.0]
    assert backoff.cap(10_000) == 5.0  # no overflow however long the outage


def test_full_jitter_stays_within_zero_and_the_cap() -> None:
    backoff = Backoff(initial=1.0, max=8.0)
    assert backoff.delay(2, lambda: 0.0) == 0.0
    assert backoff.delay(2, lambda: 0.5) == 2.0
    assert backoff.delay(2, lambda: 0.999999) < 4.0
    assert all(0 <= backoff.delay(n) <= backoff.cap(n) for n in range(20) for _ in range(20))


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"initial": -1}, {"max": 0.1, "initial": 1}, {"multiplier": 0.5}, {"max": float("inf")}],
)
def test_invalid_backoff(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


async def test_reconnect_delays_follow_the_backoff_and_reset_after_a_healthy_session() -> None:
    """Handshakes fail (503) three times, then a healthy session ends with 1012, then two failures, then a
    healthy session ends with 1013 (server trouble: the backoff keeps growing)."""
    delays: list[float] = []
    done = anyio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 8:
            done.set()
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()

    async def deny(peer: Peer) -> None:
        await peer.ws.send_denial_response(PlainTextResponse("down", status_code=503))

    def healthy_then(code: int) -> Script:
        async def script(peer: Peer) -> None:
            await peer.accept()
            request = await peer.recv()
            await peer.subscribed(request, "e1", 0)
            await peer.ws.close(code)

        return script

    fake = FakeServer(deny, deny, deny, healthy_then(1012), deny, deny, healthy_then(1013), deny)
    backoff = Backoff(initial=1.0, max=5.0, multiplier=2.0)
    async with (
        serve(fake.app) as port,
        ReplayClient(url(port), topics=["t"], backoff=backoff, rng=lambda: 1.0, sleep=sleep),
    ):
        with anyio.fail_after(TIMEOUT):
            await done.wait()
    assert not fake.errors
    assert delays == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 5.0, 5.0]
