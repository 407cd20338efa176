"""Test-side SSE clients: an SSE parser, an in-process ASGI driver, and a raw HTTP/1.1 client over TCP.

``SSEParser`` follows the HTML standard's event-stream rules closely enough
for these tests: lines end with LF, CRLF or CR; ``data``, ``id`` and
``retry`` fields; comment lines (``:``) are kept so heartbeats can be seen; a
blank line ends a message. Every message is kept with the id *after* it (the
last ``id:`` seen, as an ``EventSource`` keeps its last event id).

``AsgiStream`` calls the app directly with a scope of its own (no server, no
socket): the response start, every body chunk and the end are seen exactly as
the app sent them. ``RawStream`` speaks HTTP/1.1 over a TCP socket to a real
server, decoding chunked bodies, and can stop reading (a slow consumer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

TIMEOUT = 5.0


@dataclass
class Message:
    """One dispatched SSE message, or a comment line (``comment`` set, no data)."""

    data: str | None = None
    id: str | None = None  # the last event id after this message
    retry: int | None = None
    comment: str | None = None

    @property
    def frame(self) -> dict[str, Any]:
        assert self.data is not None, f"not a data message: {self}"
        obj: dict[str, Any] = json.loads(self.data)
        return obj


@dataclass
class SSEParser:
    """Incremental event-stream parser: ``feed`` bytes, get the messages they complete."""

    last_id: str | None = None
    _buffer: str = ""
    _data: list[str] = field(default_factory=list)
    _retry: int | None = None
    _decoder: Any = None

    def feed(self, chunk: bytes) -> list[Message]:
        import codecs

        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer += self._decoder.decode(chunk)
        out: list[Message] = []
        while True:
            cut = -1
            for sep in ("\r\n", "\n", "\r"):
                i = self._buffer.find(sep)
                if i != -1 and (cut == -1 or i < cut or (i == cut and len(sep) == 2)):
                    cut, width = i, len(sep)
            if cut == -1:
                return out
            if self._buffer[cut] == "\r" and cut + 1 == len(self._buffer):
                return out  # a CR at the end may be the start of a CRLF
            line, self._buffer = self._buffer[:cut], self._buffer[cut + width :]
            message = self._line(line)
            if message is not None:
                out.append(message)

    def _line(self, line: str) -> Message | None:
        if line == "":
            if self._retry is not None and not self._data:
                retry, self._retry = self._retry, None
                return Message(retry=retry, id=self.last_id)
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return Message(data=data, id=self.last_id, retry=self._retry)
        if line.startswith(":"):
            return Message(comment=line[1:].strip(), id=self.last_id)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None


def query(topics: Sequence[str], **params: object) -> str:
    """``topic=a&topic=b&...`` plus other parameters (None values left out)."""
    pairs: list[tuple[str, object]] = [("topic", t) for t in topics]
    pairs += [(k, v) for k, v in params.items() if v is not None]
    return urlencode(pairs)


class AsgiStream:
    """One SSE request to an ASGI app, in process. Use ``async with AsgiStream(app, ...) as s``."""

    def __init__(
        self,
        app: Any,
        path: str,
        query_string: str = "",
        headers: Mapping[str, str] | None = None,
        *,
        method: str = "GET",
    ) -> None:
        self.app = app
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = dict(headers or {})
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.body = b""
        self.ended = False  # more_body False was sent
        self.parser = SSEParser()
        self._started = anyio.Event()
        self._disconnect = anyio.Event()
        self._messages: tuple[MemoryObjectSendStream[Message], MemoryObjectReceiveStream[Message]] = (
            anyio.create_memory_object_stream[Message](10_000)
        )
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.chunks: list[bytes] = []
        # A transport that stops taking body chunks while ``stuck`` (a full socket buffer).
        self.stuck = False
        self.unstuck = anyio.Event()
        self.stalled = anyio.Event()

    async def __aenter__(self) -> AsgiStream:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        with anyio.fail_after(TIMEOUT):
            await self._started.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._disconnect.set()
        assert self._tg is not None
        with anyio.fail_after(TIMEOUT):
            await self._done.wait()
        await self._tg.__aexit__(None, None, None)
        self._messages[1].close()

    async def _run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query_string.encode(),
            "root_path": "",
            "headers": [(b"host", b"testserver")] + [(k.lower().encode(), v.encode()) for k, v in self.headers.items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "extensions": {},
        }
        sent_request = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self._disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.response_headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
                self._started.set()
            elif message["type"] == "http.response.body":
                assert not self.ended, "a body chunk after the end"
                if self.stuck:
                    self.stalled.set()
                    await self.unstuck.wait()
                chunk = message.get("body", b"")
                self.body += chunk
                if chunk:
                    self.chunks.append(chunk)
                for parsed in self.parser.feed(chunk):
                    self._messages[0].send_nowait(parsed)
                if not message.get("more_body", False):
                    self.ended = True
                    self._messages[0].close()

        try:
            await self.app(scope, receive, send)
        finally:
            self._messages[0].close()
            self._started.set()
            self._done.set()

    async def next(self, within: float = TIMEOUT, *, comments: bool = False) -> Message:
        """The next message (comments skipped unless asked for); raises EndOfStream when the body ended."""
        with anyio.fail_after(within):
            while True:
                message = await self._messages[1].receive()
                if comments or message.comment is None:
                    return message

    async def frame(self, within: float = TIMEOUT) -> tuple[dict[str, Any], str | None]:
        """The next data message's frame and the id after it (skips retry lines and comments)."""
        while True:
            message = await self.next(within)
            if message.data is not None:
                return message.frame, message.id

    async def ended_within(self, within: float = TIMEOUT) -> list[Message]:
        """Wait for the body to end; returns the messages that came before the end."""
        rest: list[Message] = []
        with anyio.fail_after(within):
            async for message in self._messages[1]:
                rest.append(message)
        return rest

    def json(self) -> Any:
        return json.loads(self.body)

    def discard(self) -> None:
        """Close the message streams of a request that was run by hand (``_run``), not with ``async with``."""
        self._messages[0].close()
        self._messages[1].close()

    @property
    def done(self) -> bool:
        """The app returned for this request."""
        return self._done.is_set()

    async def wait_done(self, within: float = TIMEOUT) -> None:
        with anyio.fail_after(within):
            await self._done.wait()


class RawStream:
    """An SSE request over a real TCP socket (HTTP/1.1, chunked bodies decoded)."""

    def __init__(self, host: str, port: int, target: str, headers: Mapping[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.headers = dict(headers or {})
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.parser = SSEParser()
        self._stream: anyio.abc.SocketStream | None = None
        self._raw = b""
        self._chunked = False
        self._pending: list[Message] = []
        self.ended = False
        self.body = b""

    async def connect(self, within: float = TIMEOUT, *, rcvbuf: int | None = None) -> RawStream:
        """Send the request and read the response's head. ``rcvbuf`` shrinks the kernel receive
        buffer before connecting (a small TCP window from the start: a slow consumer)."""
        with anyio.fail_after(within):
            if rcvbuf is None:
                self._stream = await anyio.connect_tcp(self.host, self.port)
            else:
                import asyncio
                import socket

                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
                except BaseException:
                    sock.close()
                    raise
                self._stream = await anyio.abc.SocketStream.from_socket(sock)
            lines = [f"GET {self.target} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept: text/event-stream"]
            lines += [f"{k}: {v}" for k, v in self.headers.items()]
            await self._stream.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            while b"\r\n\r\n" not in self._raw:
                self._raw += await self._stream.receive()
            head, self._raw = self._raw.split(b"\r\n\r\n", 1)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            for line in header_lines:
                name, _, value = line.partition(":")
                self.response_headers[name.strip().lower()] = value.strip()
            self._chunked = self.response_headers.get("transfer-encoding", "").lower() == "chunked"
            self._process()
        return self

    async def _more(self) -> bool:
        """Read more of the body into the parser; False at its end."""
        assert self._stream is not None
        if self.ended:
            return False
        try:
            data = await self._stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            self.ended = True
            return False
        self._raw += data
        self._process()
        return True

    def _process(self) -> None:
        """Decode what was received (chunks, or a plain body) into the parser."""
        if not self._chunked:
            body, self._raw = self._raw, b""
            self._feed(body)
            return
        while not self.ended:
            line_end = self._raw.find(b"\r\n")
            if line_end == -1:
                return
            size = int(self._raw[:line_end].split(b";")[0], 16)
            if len(self._raw) < line_end + 2 + size + 2:
                return
            chunk = self._raw[line_end + 2 : line_end + 2 + size]
            self._raw = self._raw[line_end + 2 + size + 2 :]
            if size == 0:
                self.ended = True
                return
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        self.body += chunk
        self._pending += self.parser.feed(chunk)

    async def next(self, within: float = TIMEOUT, *, comments: bool = False) -> Message | None:
        """The next message, or None at the end of the body."""
        with anyio.fail_after(within):
            while True:
                while self._pending:
                    message = self._pending.pop(0)
                    if comments or message.comment is None:
                        return message
                if not await self._more():
                    return None

    async def frame(self, within: float = TIMEOUT) -> tuple[dict[str, Any], str | None] | None:
        """The next data message's frame and the id after it; None at the end of the body."""
        while True:
            message = await self.next(within)
            if message is None:
                return None
            if message.data is not None:
                return message.frame, message.id

    async def read_body(self, within: float = TIMEOUT) -> bytes:
        """The rest of a (non-stream) body: until Content-Length bytes or the end."""
        length = int(self.response_headers.get("content-length", "-1"))
        with anyio.fail_after(within):
            while length < 0 or len(self.body) < length:
                if not await self._more():
                    break
        return self.body

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def abort(self) -> None:
        """Drop the TCP connection at once (RST), as a browser tab that is killed."""
        import socket
        import struct

        if self._stream is None:
            return
        sock = self._stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream, self._stream = self._stream, None
        await stream.aclose()


class SSESubscriber:
    """One logical SSE subscriber across reconnects, over :class:`RawStream`, checking every frame.

    Reconnects with the last id it received as ``Last-Event-ID`` (as an
    ``EventSource`` does). Within one stream, each topic's events must follow
    its ``subscribed`` at ``offset - replayed + 1``, ``+2``, ... with no gap
    and no duplicate; a resume with a cursor must be ``recovered``; the id after
    each frame must be the cursor list the client would resume from. Problems
    go to :attr:`violations`; :attr:`delivered` is every event handed on, per
    topic, across streams (each offset once, in order, is what tests assert).
    """

    def __init__(self, host: str, port: int, topics: Sequence[str], *, path: str = "/sse", name: str = "sse") -> None:
        self.host = host
        self.port = port
        self.topics = list(topics)
        self.path = path
        self.name = name
        self.last_id: str | None = None
        self.stream: RawStream | None = None
        self.violations: list[str] = []
        self.delivered: dict[str, list[int]] = {t: [] for t in topics}
        self.data: dict[str, list[Any]] = {t: [] for t in topics}
        self.subscribed: list[dict[str, Any]] = []  # every subscribed frame, in order
        self.epochs: dict[str, str] = {}
        self._expect: dict[str, int | None] = {}  # next offset per topic in this stream (None: before subscribed)
        self._sent: dict[str, tuple[str, int] | None] = {}  # the cursor each topic resumed from in this stream
        self.streams = 0

    def offset(self, topic: str) -> int:
        got = self.delivered[topic]
        return got[-1] if got else 0

    async def connect(
        self, *, headers: Mapping[str, str] | None = None, rcvbuf: int | None = None, **params: object
    ) -> RawStream:
        await self.drop()  # an ended stream's socket
        sent = dict(headers or {})
        if self.last_id is not None:
            sent["Last-Event-ID"] = self.last_id
        stream = RawStream(self.host, self.port, f"{self.path}?{query(self.topics, **params)}", sent)
        await stream.connect(rcvbuf=rcvbuf)
        if stream.status != 200:
            self.violations.append(f"{self.name}: HTTP {stream.status}: {await stream.read_body()!r}")
        self.stream = stream
        self.streams += 1
        self._expect = dict.fromkeys(self.topics)
        entries = self.last_id.split(",") if self.last_id is not None else [""] * len(self.topics)
        self._sent = {}
        for topic, entry in zip(self.topics, entries, strict=True):
            parts = entry.split(":")
            self._sent[topic] = (parts[0], int(parts[1])) if entry else None
        return stream

    def last_subscribed(self, topic: str) -> dict[str, Any]:
        """The newest ``subscribed`` frame of ``topic``."""
        return [frame for frame in self.subscribed if frame["topic"] == topic][-1]

    def _check(self, frame: dict[str, Any], event_id: str | None) -> None:
        kind, topic = frame.get("type"), frame.get("topic")
        if topic not in self._expect:
            self.violations.append(f"{self.name}: frame of a topic not asked for: {frame}")
            return
        if kind == "subscribed":
            self.subscribed.append(frame)
            if self._expect[topic] is not None:
                self.violations.append(f"{self.name}: a second subscribed for {topic!r}: {frame}")
            self._expect[topic] = frame["offset"] - frame["replayed"] + 1
            sent = self._sent.get(topic)
            if sent is not None and sent[0] == frame["epoch"] and not frame["recovered"]:
                self.violations.append(f"{self.name}: resume of {topic!r} from {sent} not recovered: {frame}")
            if sent is not None and frame["recovered"] and frame["offset"] - frame["replayed"] != sent[1]:
                self.violations.append(f"{self.name}: replay of {topic!r} does not start at {sent}: {frame}")
            self.epochs[topic] = frame["epoch"]
        elif kind == "event":
            expected = self._expect[topic]
            if expected is None:
                self.violations.append(f"{self.name}: event before subscribed: {frame}")
            elif frame["offset"] != expected:
                self.violations.append(f"{self.name}: {topic!r} expected offset {expected}, got {frame['offset']}")
            self._expect[topic] = frame["offset"] + 1
            self.delivered[topic].append(frame["offset"])
            self.data[topic].append(frame["data"])
        else:
            self.violations.append(f"{self.name}: unexpected frame {frame}")
        if event_id is None:
            self.violations.append(f"{self.name}: no id after {frame}")
        self.last_id = event_id

    async def recv(self, within: float = TIMEOUT) -> dict[str, Any] | None:
        """The next frame, checked; None when the stream ended."""
        assert self.stream is not None
        got = await self.stream.frame(within)
        if got is None:
            return None
        frame, event_id = got
        self._check(frame, event_id)
        return frame

    async def read_until(self, targets: Mapping[str, int], within: float = 20.0) -> None:
        """Read until every topic in ``targets`` reached that offset; raises if the stream ends first."""
        with anyio.fail_after(within):
            while any(self.offset(t) < o for t, o in targets.items()):
                if await self.recv(within) is None:
                    raise AssertionError(f"{self.name}: the stream ended at {self.delivered_heads()}")

    async def read_until_or_end(self, targets: Mapping[str, int], within: float = 20.0) -> bool:
        """As read_until; False when the stream ended first (then reconnect)."""
        with anyio.fail_after(within):
            while any(self.offset(t) < o for t, o in targets.items()):
                if await self.recv(within) is None:
                    return False
        return True

    def delivered_heads(self) -> dict[str, int]:
        return {t: self.offset(t) for t in self.topics}

    async def drop(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def abort(self) -> None:
        if self.stream is not None:
            await self.stream.abort()
            self.stream = None

    def assert_exact(self, heads: Mapping[str, int]) -> None:
        """No violation, and each topic delivered exactly 1..head, once each, in order."""
        assert not self.violations, self.violations[:10]
        for topic, head in heads.items():
            got = self.delivered[topic]
            assert got == list(range(1, head + 1)), (
                f"{self.name}: {topic!r}: {len(got)} delivered, dups {len(got) - len(set(got))}, "
                f"missing {sorted(set(range(1, head + 1)) - set(got))[:10]}"
            )
