"""The lean benchmark client: N raw WebSocket connections (or SSE streams) in one process.

Standard library (plus uvloop when installed), no WebSocket library: a minimal
RFC 6455 client on an ``asyncio.Protocol`` that offers no extension (so no
compression), parses frame headers, and reads the event's ``"s":`` (sequence)
and ``"t":`` (due time, ``time.monotonic_ns()`` in the server) by slicing the
frame, never with a JSON parser. It costs far less per event than the servers.

Modes (``--mode``):

- ``fanout``: open ``--clients`` connections, subscribe each to ``--topic``, then
  ``POST /publish`` (the trigger) and wait until every connection has
  ``--events`` events. Reports delivered events/s from the trigger to the last
  frame, gaps and duplicates (from ``s``), closes, and with ``--latency`` the
  publish-to-receive latency from ``t``. With ``--distinct``, connection i
  subscribes to a topic of its own, ``<--topic>-<i>``, and the trigger is
  ``POST /publish-topics`` (one publisher per topic, all at once, ``--events``
  each); gaps and duplicates are still counted per connection, so per topic.
- ``catchup``: one connection sends a resume (``--kind replay``: a ``subscribe``
  with ``--epoch``/``--after``; ``--kind raw``: ``{"topic", "after"}`` to the
  raw loop) and waits for ``--events`` events.
- ``idle``: open ``--clients`` subscribed connections, print ``{"ready": N}``
  and hold them until stdin is closed.
- ``tokens``: token streams (``bench.run tokens``): like ``fanout`` with
  ``--distinct``, but the trigger is ``POST /tokens`` (``--trigger`` holds its
  query) and an event carries ``"k":`` tokens; a connection is done at the
  event with ``"f":1`` (its stream's last). Reports tokens received and, with
  ``--latency``, one sample per token from the event's ``t`` (the due time of
  its oldest token: an upper bound for the others).

``--kind``: ``replay`` (the library's protocol), ``plain`` (bare and
broadcaster servers: same subscribe frame, ``{"type":"subscribed"}`` back),
``socketio`` (Engine.IO 4 / Socket.IO 5 over a WebSocket, text packets),
``sse`` (the library's SSE route: ``GET <path>?topic=T`` over HTTP/1.1, the
chunked body read as it comes, the same frames in ``data:`` lines; a resume
sends ``Last-Event-ID: <epoch>:<after>``).
Every run is bounded by ``--timeout`` and prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

_SEQ = b'"s":'
_DUE = b'"t":'
_COUNT = b'"k":'
_FINAL = b'"f":1'


def _frame(text: str, opcode: int = 0x1) -> bytes:
    """A masked client frame."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return header + mask + masked


def _control(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class Run:
    """Shared state of one run: targets, counters, the completion event."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.target = args.events
        self.tokens = args.mode == "tokens"
        self.latency = args.latency
        self.samples: list[int] = []
        self.done = asyncio.Event()
        self.pending = 0  # connections that have not reached the target
        self.closes: dict[str, int] = {}
        self.first_at = 0
        self.last_at = 0
        self.stopping = False  # set once this client starts closing its connections


class Conn(asyncio.Protocol):
    def __init__(self, run: Run, first: str, path: str, host: str) -> None:
        self.run = run
        self.first = first
        self.path = path
        self.host = host
        self.kind = run.args.kind
        self.buf = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.expected = 0
        self.received = 0
        self.tokens = 0
        self.complete = False  # tokens mode: the stream's last event arrived
        self.gaps = 0
        self.dups = 0
        self.finished = False
        self.closed = False
        self.started_at = 0

    # --- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        key = base64.b64encode(os.urandom(16)).decode()
        protocol = "Sec-WebSocket-Protocol: replay.v1\r\n" if self.kind == "replay" else ""
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed("lost")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            if self.kind != "socketio":
                self.send(self.first)
                self.started_at = time.monotonic_ns()
        pos = 0
        size = len(buf)
        run = self.run
        while size - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            if b1 < 126:
                start = pos + 2
                length = b1
            elif b1 == 126:
                if size - pos < 4:
                    break
                start = pos + 4
                length = (buf[pos + 2] << 8) | buf[pos + 3]
            else:
                if size - pos < 10:
                    break
                start = pos + 10
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            end = start + length
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            pos = end
            if opcode == 0x1:
                i = buf.find(_SEQ, start, end)
                if i < 0:
                    self._other(bytes(buf[start:end]))
                    continue
                j = buf.find(b",", i, end)
                seq = int(buf[i + 4 : j])
                if seq == self.expected:
                    self.expected = seq + 1
                elif seq < self.expected:
                    self.dups += 1
                else:
                    self.gaps += seq - self.expected
                    self.expected = seq + 1
                self.received += 1
                count = 1
                if run.tokens:
                    c = buf.find(_COUNT, j, end)
                    count = int(buf[c + 4 : buf.find(b",", c, end)])
                    self.tokens += count
                if run.latency:
                    k = buf.find(_DUE, j, end)
                    m = buf.find(b",", k, end)
                    sample = now - int(buf[k + 4 : m])
                    if count == 1:
                        run.samples.append(sample)
                    else:
                        run.samples.extend([sample] * count)
                if run.first_at == 0:
                    run.first_at = now
                run.last_at = now
                if run.tokens:
                    if buf.find(_FINAL, j, end) >= 0 and not self.finished:
                        self.complete = True
                        self._finish()
                elif self.received >= run.target and not self.finished:
                    self._finish()
            elif opcode == 0x9:
                self._write(_control(0xA, bytes(buf[start:end])))
            elif opcode == 0x8:
                code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
                self._closed(str(code))
                if self.transport is not None:
                    self.transport.close()
                break
        del buf[:pos]

    # --- helpers -----------------------------------------------------------------

    def send(self, text: str) -> None:
        self._write(_frame(text))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _other(self, payload: bytes) -> None:
        """A frame that is not an event: readiness, Engine.IO control packets, errors."""
        if self.kind == "socketio":
            if payload[:1] == b"0":  # Engine.IO open: connect the default namespace
                self.send("40")
            elif payload == b"2":  # Engine.IO ping
                self.send("3")
            elif payload[:2] == b"40":  # namespace connected: join the topic's room
                self.send(self.first)
                self.started_at = time.monotonic_ns()
            elif payload.startswith(b'42["subscribed"') and not self.ready.done():
                self.ready.set_result(None)
            return
        if b'"type":"subscribed"' in payload:
            if not self.ready.done():
                self.ready.set_result(None)
        elif b'"type":"error"' in payload:
            self._fail(payload.decode(errors="replace"))

    def _finish(self) -> None:
        self.finished = True
        run = self.run
        run.pending -= 1
        if run.pending <= 0:
            run.done.set()

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        self._closed("error")

    def _closed(self, how: str) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.run.stopping:  # a close the server chose, even after the last event
            self.run.closes[how] = self.run.closes.get(how, 0) + 1
        if not self.finished:
            self._finish()  # it will not get more: do not wait for it
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"closed ({how}) before subscribed"))


class SSEConn(Conn):
    """One SSE stream: an HTTP/1.1 GET, then the chunked body, each chunk one SSE message (uvicorn
    writes one per ``send``); events are counted from their ``"s":`` as on a WebSocket."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        resume = f"Last-Event-ID: {self.run.args.epoch}:{self.run.args.after}\r\n" if self.run.args.epoch else ""
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET {self.path}?topic={self.first} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Accept: text/event-stream\r\n{resume}\r\n"
            ).encode()
        )
        self.started_at = time.monotonic_ns()

    def send(self, text: str) -> None:
        pass  # no client frames over SSE

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 200 " not in status:
                self._fail(f"stream refused: {status.decode(errors='replace')} {bytes(buf[:300])!r}")
                return
            self.upgraded = True
        pos = 0
        size = len(buf)
        run = self.run
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            length = int(buf[pos:line_end], 16)
            start = line_end + 2
            end = start + length
            if end + 2 > size:
                break
            pos = end + 2
            if length == 0:  # the end of the body: the server ended the stream
                self._closed("ended")
                break
            i = buf.find(_SEQ, start, end)
            if i < 0:
                self._other(bytes(buf[start:end]))
                continue
            j = buf.find(b",", i, end)
            seq = int(buf[i + 4 : j])
            if seq == self.expected:
                self.expected = seq + 1
            elif seq < self.expected:
                self.dups += 1
            else:
                self.gaps += seq - self.expected
                self.expected = seq + 1
            self.received += 1
            if run.latency:
                k = buf.find(_DUE, j, end)
                m = buf.find(b",", k, end)
                run.samples.append(now - int(buf[k + 4 : m]))
            if run.first_at == 0:
                run.first_at = now
            run.last_at = now
            if self.received >= run.target and not self.finished:
                self._finish()
        del buf[:pos]


def _topic(args: argparse.Namespace, index: int) -> str:
    """Connection ``index``'s topic: ``--topic``, or with ``--distinct`` one of its own
    (as bench/servers/_common.py's ``topic_name`` names the publishers' topics)."""
    return f"{args.topic}-{index}" if args.distinct else str(args.topic)


def _first_frame(args: argparse.Namespace, index: int = 0) -> str:
    topic = _topic(args, index)
    if args.kind == "socketio":
        return "42" + json.dumps(["subscribe", {"topic": topic}])
    if args.kind == "raw":
        return json.dumps({"topic": topic, "after": args.after})
    if args.kind == "sse":
        return topic  # the stream's query: ?topic=<this>
    frame: dict[str, Any] = {"type": "subscribe", "topic": topic}
    if args.epoch is not None:
        frame.update(epoch=args.epoch, offset=args.after)
    return json.dumps(frame)


async def _connect(run: Run, args: argparse.Namespace, count: int) -> list[Conn]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path or "/"
    if args.kind == "socketio":
        path = "/socket.io/?EIO=4&transport=websocket"
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    batch = 100  # stay well below the server's listen backlog

    kind = SSEConn if args.kind == "sse" else Conn

    def factory(index: int) -> Callable[[], Conn]:
        first = _first_frame(args, index)
        return lambda: kind(run, first, path, f"{host}:{port}")

    for at in range(0, count, batch):
        made = await asyncio.gather(
            *(loop.create_connection(factory(at + k), host, port) for k in range(min(batch, count - at)))
        )
        conns.extend(protocol for _, protocol in made)
        if args.mode != "catchup":
            await asyncio.gather(*(c.ready for c in conns[at:]))
    return conns


async def _trigger(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.http)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    if args.mode == "tokens":
        route, query = "/tokens", f"topic={args.topic}&streams={args.clients}&{args.trigger}"
    elif args.distinct:
        route, query = "/publish-topics", f"topic={args.topic}&topics={args.clients}&n={args.events}"
    else:
        route, query = "/publish", f"topic={args.topic}&n={args.events}&rate={args.rate}"
    request = f"POST {route}?{query} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"trigger failed: {response[:300]!r}")
    result: dict[str, Any] = json.loads(body)
    return result


def _percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def main(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    count = 1 if args.mode == "catchup" else args.clients
    run.pending = count
    conns = await asyncio.wait_for(_connect(run, args, count), args.timeout)
    try:
        if args.mode == "idle":
            print(json.dumps({"ready": len(conns)}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            return {"ready": len(conns)}
        trigger: dict[str, Any] = {}
        started = time.monotonic_ns()
        timed_out = False
        triggered = args.mode in ("fanout", "tokens")
        if triggered:
            trigger_task = asyncio.ensure_future(_trigger(args))
        done = asyncio.ensure_future(run.done.wait())
        waits: set[asyncio.Future[Any]] = {done, trigger_task} if triggered else {done}
        deadline = time.monotonic() + args.timeout
        while not done.done():  # all delivered, or the trigger failed (then it raises below), or the timeout
            left = max(0.0, deadline - time.monotonic())
            finished, _ = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not finished:
                timed_out = True
                break
            if triggered and trigger_task.done() and trigger_task.exception() is not None:
                break
            waits -= finished
        done.cancel()
        if triggered:
            trigger = await asyncio.wait_for(trigger_task, args.timeout)
        else:
            started = conns[0].started_at
        # A server that gives up on a connection (e.g. 1013) may do so right after
        # the last event: give such closes a moment to arrive so they are reported.
        await asyncio.sleep(args.grace)
        received = sum(c.received for c in conns)
        seconds = (run.last_at - started) / 1e9 if run.last_at else float("nan")
        result: dict[str, Any] = {
            "mode": args.mode,
            "clients": count,
            "events": args.events,
            "expected": args.events * count,
            "received": received,
            "seconds": seconds,
            "rate": received / seconds if run.last_at else 0.0,
            "gaps": sum(c.gaps for c in conns),
            "duplicates": sum(c.dups for c in conns),
            "short_clients": sum(1 for c in conns if c.received < args.events),
            "closes": run.closes,
            "topics": count if args.distinct else 1,
            "timed_out": timed_out,
            "publish": trigger,
        }
        if run.tokens:
            # the events each stream published are only known to the server (coalescing decides them)
            tokens = sum(c.tokens for c in conns)
            result.update(
                tokens=tokens,
                tokens_expected=int(trigger.get("tokens", 0)),
                events_expected=int(trigger.get("events", 0)),
                token_rate=tokens / seconds if run.last_at else 0.0,
            )
            result["expected"] = result["events_expected"]
            result["short_clients"] = sum(1 for c in conns if not c.complete)
        if run.latency:
            ordered = sorted(run.samples)
            result["latency_ms"] = {
                "p50": _percentile(ordered, 0.50),
                "p99": _percentile(ordered, 0.99),
                "max": ordered[-1] / 1e6 if ordered else float("nan"),
                "samples": len(ordered),
            }
        return result
    finally:
        run.stopping = True
        for c in conns:
            if c.transport is not None and not c.transport.is_closing():
                if c.kind != "sse":
                    c._write(_control(0x8, (1000).to_bytes(2, "big")))
                c.transport.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/ws")
    p.add_argument("--http", default="", help="http://127.0.0.1:PORT (the trigger, fanout mode)")
    p.add_argument("--kind", choices=["replay", "plain", "socketio", "raw", "sse"], required=True)
    p.add_argument("--mode", choices=["fanout", "catchup", "idle", "tokens"], default="fanout")
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="events/s, open loop (0: back to back)")
    p.add_argument("--topic", default="bench")
    p.add_argument("--distinct", action="store_true", help="fanout: a topic per connection, <topic>-<i>")
    p.add_argument("--epoch", default=None)
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--trigger", default="", help="tokens: the rest of POST /tokens' query (rate=..&tokens=..&mode=..)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--grace", type=float, default=0.5, help="seconds to wait for late closes after the last event")
    return p.parse_args(argv)


def raise_nofile(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit): a
    socket per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


if __name__ == "__main__":
    arguments = parse_args()
    raise_nofile(arguments.clients + 256)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(main(arguments))
    else:
        result = uvloop.run(main(arguments))
    print(json.dumps(result), flush=True)
