"""A checking test client: one logical subscriber across reconnects, over a real ``websockets`` socket.

:class:`Subscriber` keeps a cursor per topic, reconnects with it, and checks
every frame as it arrives:

* within one subscription (from ``subscribed`` on), events of the topic carry
  the offsets ``head - replayed + 1``, ``+2``, ... with no gap and no duplicate;
* a resume with a cursor is ``recovered`` and replays exactly from it;
* no event of a topic the connection does not hold.

Every problem is recorded in :attr:`Subscriber.violations` (so that a client
running in a task group does not hide the others' failures) and the test
asserts that list is empty. :attr:`Subscriber.delivered` is the union over all
connections of the events handed to the "application": each must appear once,
in order, which :func:`assert_exact` checks against what was published.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from starlette_replay.protocol import ErrorFrame, EventFrame, ServerFrame, Subscribed, parse_server_frame

__all__ = ["Delivered", "Subscriber", "abort_all", "assert_exact", "open_socket", "wait_for_stats"]

SUBPROTOCOLS = [Subprotocol("replay.v1")]


async def open_socket(
    url: str,
    *,
    origin: str | None = None,
    rcvbuf: int | None = None,
    max_queue: int | None = 16,
    max_size: int | None = 2**22,
    close_timeout: float | None = 2,
    **kwargs: Any,
) -> ClientConnection:
    """Open a client socket: ``replay.v1``, no compression (traps.md), no keepalive pings, no proxy.

    ``rcvbuf`` shrinks the kernel receive buffer (set before connecting, so the
    TCP window is small from the start). Raises what ``websockets.connect`` raises
    (``InvalidStatus`` for a refused handshake); it times out by itself (5 s).
    """
    sock = None
    if rcvbuf is not None:
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            with anyio.fail_after(5):
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        except BaseException:
            sock.close()
            raise
    return await connect(
        url,
        sock=sock,
        origin=None if origin is None else Origin(origin),
        subprotocols=SUBPROTOCOLS,
        compression=None,
        proxy=None,
        ping_interval=None,
        open_timeout=5,
        close_timeout=close_timeout,
        max_queue=max_queue,
        max_size=max_size,
        **kwargs,
    )


@dataclass(frozen=True, slots=True)
class Delivered:
    epoch: str
    offset: int
    event: str
    data: Any


@dataclass
class _Sub:
    epoch: str
    next: int  # offset the next event must carry


@dataclass
class Subscriber:
    """One logical client of ``topics`` that may reconnect many times.

    The first subscription to a topic asks for ``rewind`` retained events (by
    default all of them), later ones resume from the cursor.
    """

    url: str
    topics: list[str]
    name: str = "client"
    rewind: int = 1_000_000
    origin: str | None = None
    expect_recovered: bool = True
    stored_cursor: bool = False  # the server may resume a cursor-less subscribe from the identity's cursor
    socket_options: dict[str, Any] = field(default_factory=dict)

    cursors: dict[str, tuple[str, int]] = field(default_factory=dict)
    delivered: dict[str, list[Delivered]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    connections: list[list[str]] = field(default_factory=list)  # raw frames, per connection
    close_codes: list[int | None] = field(default_factory=list)
    subscribed_frames: list[Subscribed] = field(default_factory=list)
    server_closes: list[tuple[int | None, str]] = field(default_factory=list)  # closes we did not ask for
    ignored: int = 0  # events of a replaced subscription that arrived before its new `subscribed`
    ws: ClientConnection | None = None
    _subs: dict[str, _Sub] = field(default_factory=dict)
    _asked: dict[str, deque[tuple[str, int] | None]] = field(default_factory=dict)
    _replacing: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for topic in self.topics:
            self.delivered.setdefault(topic, [])

    def _violation(self, message: str) -> None:
        self.violations.append(f"{self.name} (connection {len(self.connections)}): {message}")

    # --- connection ----------------------------------------------------------------

    async def connect(self, *, subscribe: bool = True) -> ClientConnection:
        """Open a new connection and (by default) subscribe to every topic from its cursor."""
        self.ws = await open_socket(self.url, origin=self.origin, **self.socket_options)
        self.connections.append([])
        self._subs = {}
        self._asked = {}
        self._replacing = set()
        if subscribe:
            for topic in self.topics:
                await self.subscribe(topic)
        return self.ws

    def subscribe_frame(self, topic: str) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "topic": topic, "ref": f"{self.name}:{topic}"}
        cursor = self.cursors.get(topic)
        if cursor is not None:
            frame["epoch"], frame["offset"] = cursor
        else:
            frame["rewind"] = self.rewind
        return frame

    async def subscribe(self, topic: str) -> None:
        """Send a subscribe for ``topic`` from this client's cursor (fresh with ``rewind`` without one).

        On a connection that holds the topic already this replaces the
        subscription: its events still in flight are ignored until the new
        ``subscribed`` arrives, as a real client must.
        """
        frame = self.subscribe_frame(topic)
        asked = self._asked.setdefault(topic, deque())
        asked.append(self.cursors.get(topic))
        if self._subs.pop(topic, None) is not None or len(asked) > 1:
            self._replacing.add(topic)
        await self.send(frame)

    async def send(self, frame: Mapping[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(frame))

    async def drop(self, *, abort: bool = False) -> None:
        """Leave: a clean close (1000), or with ``abort`` a dead TCP connection (no close frame)."""
        ws, self.ws = self.ws, None
        if ws is None:
            return
        if not abort:
            with anyio.move_on_after(3):
                await ws.close()
        # Also after a close that did not finish in time (a loaded machine): a socket left open
        # is a ResourceWarning, an error under filterwarnings, when it is collected.
        ws.transport.abort()
        self.close_codes.append(ws.close_code)

    def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame; for cleanup in ``finally``. Idempotent."""
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.transport.abort()

    # --- receiving -----------------------------------------------------------------

    async def recv(self) -> ServerFrame:
        """Receive, record and check one frame. Raises ``ConnectionClosed`` when the socket closes."""
        assert self.ws is not None
        try:
            text = await self.ws.recv()
        except ConnectionClosed as exc:
            self.close_codes.append(self.ws.close_code)
            self.server_closes.append((exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""))
            raise
        if not isinstance(text, str):
            self._violation(f"binary frame {text[:40]!r}")
            text = text.decode()
        self.connections[-1].append(text)
        frame = parse_server_frame(text)
        self._check(frame)
        return frame

    def _check(self, frame: ServerFrame) -> None:
        if isinstance(frame, Subscribed):
            self.subscribed_frames.append(frame)
            if frame.topic not in self.topics:
                self._violation(f"subscribed to a topic never asked for: {frame}")
                return
            asked = self._asked.get(frame.topic)
            if not asked:
                self._violation(f"subscribed without a subscribe: {frame}")
                return
            cursor = asked.popleft()
            start = frame.offset - frame.replayed
            if cursor is None:
                if (frame.resumed or frame.recovered) and not self.stored_cursor:
                    self._violation(f"fresh subscribe answered as a resume: {frame}")
            elif not (frame.resumed and frame.recovered) or cursor[0] != frame.epoch:
                if self.expect_recovered:
                    self._violation(f"resume from {cursor} not recovered: {frame}")
            elif start != cursor[1]:
                self._violation(f"resume from {cursor} replays from {start}: {frame}")
            if asked:
                return  # replaced again already: ignore this one's events until the last `subscribed`
            self._replacing.discard(frame.topic)
            self._subs[frame.topic] = _Sub(frame.epoch, start + 1)
            if cursor is None or cursor[0] != frame.epoch:
                self.cursors[frame.topic] = (frame.epoch, start)
        elif isinstance(frame, EventFrame):
            sub = self._subs.get(frame.topic)
            if sub is None and frame.topic in self._replacing:
                self.ignored += 1
                return
            if sub is None:
                self._violation(f"event of a topic not subscribed on this connection: {frame}")
                return
            if frame.offset != sub.next:
                kind = "duplicate" if frame.offset < sub.next else "gap"
                self._violation(f"{kind}: {frame.topic} offset {frame.offset}, expected {sub.next}")
                # Resynchronise so that one fault is reported once, not for every later event.
                sub.next = frame.offset + 1
                return
            sub.next += 1
            self.delivered[frame.topic].append(Delivered(sub.epoch, frame.offset, frame.event, frame.data))
            self.cursors[frame.topic] = (sub.epoch, frame.offset)
        elif isinstance(frame, ErrorFrame):
            self._violation(f"error frame: {frame}")

    async def read_until(self, targets: Mapping[str, int]) -> None:
        """Receive until the cursor of each topic in ``targets`` reaches its offset.

        No timeout of its own: wrap it in ``anyio.fail_after``. Raises
        ``ConnectionClosed`` when the socket closes first.
        """
        while any(self.offset(topic) < last for topic, last in targets.items()):
            await self.recv()

    def offset(self, topic: str) -> int:
        cursor = self.cursors.get(topic)
        return 0 if cursor is None else cursor[1]

    def offsets(self, topic: str) -> list[int]:
        return [d.offset for d in self.delivered[topic]]


def abort_all(subscribers: Iterable[Subscriber]) -> None:
    """:meth:`Subscriber.abort` each one: a test's ``finally``, so a failure leaks no socket."""
    for sub in subscribers:
        sub.abort()


def assert_exact(
    subscribers: Iterable[Subscriber],
    published: Mapping[str, tuple[str, int]],
    *,
    first: int = 1,
) -> None:
    """Every subscriber got, over all its connections, each event of its topics exactly once, in order.

    ``published`` maps a topic to (epoch, last offset); events ``first..last`` are
    expected. Also asserts that no subscriber recorded a violation.
    """
    problems: list[str] = []
    for sub in subscribers:
        problems += sub.violations
        for topic in sub.topics:
            epoch, last = published[topic]
            got = sub.offsets(topic)
            want = list(range(first, last + 1))
            if got != want:
                missing = sorted(set(want) - set(got))
                extra = len(got) - len(set(got))
                problems.append(
                    f"{sub.name} {topic}: {len(got)} events, want {len(want)}; "
                    f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, {extra} duplicates"
                )
            epochs = {d.epoch for d in sub.delivered[topic]}
            if epochs - {epoch}:
                problems.append(f"{sub.name} {topic}: events from epochs {epochs}, want {epoch}")
    assert not problems, "\n".join(problems[:50])


async def wait_for_stats(
    http: httpx.AsyncClient, predicate: Callable[[dict[str, int]], bool], within: float = 10.0
) -> dict[str, int]:
    """Poll the test app's ``GET /stats`` until ``predicate`` holds; returns those stats.

    The server is another process: there is no event to wait on, only its
    answers. Raises ``TimeoutError`` after ``within`` seconds.
    """
    with anyio.fail_after(within):
        while True:
            stats: dict[str, int] = (await http.get("/stats")).json()
            if predicate(stats):
                return stats
            await anyio.sleep(0.02)
