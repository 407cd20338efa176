"""The Redis event store: Streams keep each topic's history, pub/sub carries it live.

Every key of a topic shares the hash tag ``{<topic>}`` (``replay:{user:42}:meta``,
``...:log``, ``...:idem``, ``...:idemz``, ``...:cursor:<identity>``), so each
script touches one cluster slot. One Lua script per append makes the epoch if the
topic has none (the epoch comes from Python's ``secrets``: Redis 7.0's Lua
``math.random`` repeats after a restart), bumps the head, XADDs entries whose ids
are the offsets (``<offset>-0``), trims to ``history_size`` exactly, refreshes
``history_ttl`` and PUBLISHes the events, all in one step.

Commands run on connections of the store's own, made with the client's settings
(never taken from its pool) and without a socket timeout: ``publish_timeout``
bounds each command. Live fan-out runs on one dedicated pub/sub connection per
store, speaking RESP2. A listener task tracks the last offset delivered
per topic, repairs any hole from the stream, and after a reconnect repairs every
topic from where it stood; when it cannot (epoch changed, history trimmed) it
calls ``sink.reset(topic)``.

``redis`` (redis-py) is imported lazily: ``from starlette_replay import RedisStore``
works without it; constructing a store without it raises ``ImportError``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .._checks import check_int, check_seconds
from ..errors import StoreError, StoreUnavailable
from ..events import Event
from .base import Cursor, LiveSink, Position

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection

__all__ = ["RedisStore"]

logger = logging.getLogger("starlette_replay.stores.redis")

_MISSING_REDIS = "RedisStore needs redis-py: pip install 'starlette-replay[redis]'"

# One or several appends to one topic in one step (concurrent publishes coalesced),
# each with its own idempotency key. KEYS: meta, log, idem, idemz.
# ARGV: new epoch, history_size, ttl ms, channel, nseg, then per segment: key ('' none), n, type1, raw1, ...
# Returns {epoch, ms, r1, r2, ...}: r is the segment's first offset, or {entries} for a known key.
_APPEND_BATCH = """
local meta, log, idem, idemz = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  redis.call('DEL', log, idem, idemz)
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch, 'head', 0)
end
local now = redis.call('TIME')
local ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
local start = tonumber(redis.call('HGET', meta, 'head'))
local head = start
local out = {epoch, ms}
local parts = {}
local keyed = false
local pos = 6
for s = 1, tonumber(ARGV[5]) do
  local key, n = ARGV[pos], tonumber(ARGV[pos + 1])
  local seen = false
  if key ~= '' then
    keyed = true
    seen = redis.call('HGET', idem, key)
  end
  if seen then
    local a, b = string.match(seen, '^(%d+):(%d+)$')
    out[#out + 1] = redis.call('XRANGE', log, a, b)
  else
    -- XADD before the head moves: a script that fails is not rolled back, and only
    -- the first XADD can fail (an id at or below the stream's top), with nothing written yet.
    for i = 1, n do
      local etype, raw = ARGV[pos + 2 * i], ARGV[pos + 1 + 2 * i]
      redis.call('XADD', log, (head + i) .. '-0', 't', etype, 'd', raw, 'ms', ms)
      parts[#parts + 1] = #etype .. ':' .. etype .. #raw .. ':' .. raw
    end
    if key ~= '' then
      redis.call('HSET', idem, key, (head + 1) .. ':' .. (head + n))
      redis.call('ZADD', idemz, head + 1, key)
    end
    out[#out + 1] = head + 1
    head = head + n
  end
  pos = pos + 2 + 2 * n
end
if head == start then return out end
redis.call('HSET', meta, 'head', head)
redis.call('XTRIM', log, 'MAXLEN', ARGV[2])
if keyed or redis.call('EXISTS', idemz) == 1 then
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  local oldest = head + 1
  if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
  while true do
    local stale = redis.call('ZRANGEBYSCORE', idemz, '-inf', '(' .. oldest, 'LIMIT', 0, 500)
    if #stale == 0 then break end
    redis.call('HDEL', idem, unpack(stale))
    redis.call('ZREM', idemz, unpack(stale))
  end
end
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', meta, ARGV[3])
  redis.call('PEXPIRE', log, ARGV[3])
  redis.call('PEXPIRE', idem, ARGV[3])
  redis.call('PEXPIRE', idemz, ARGV[3])
end
local header = epoch .. '|' .. (start + 1) .. '|' .. ms .. '|' .. (head - start) .. '|'
redis.call('PUBLISH', ARGV[4], header .. table.concat(parts))
return out
"""

# KEYS: meta, log, idem, idemz
# ARGV: epoch to create when missing ('' to create nothing), ttl ms, first offset to read, limit
_STATE = """
local meta, log = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'head')
if not m[1] then
  if ARGV[1] == '' then return {'', 0, 1, {}} end
  redis.call('DEL', log, KEYS[3], KEYS[4])
  redis.call('HSET', meta, 'epoch', ARGV[1], 'head', 0)
  if ARGV[2] ~= '0' then redis.call('PEXPIRE', meta, ARGV[2]) end
  return {ARGV[1], 0, 1, {}}
end
local head = tonumber(m[2])
local oldest = head + 1
local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
local entries = {}
if tonumber(ARGV[4]) > 0 then
  entries = redis.call('XRANGE', log, ARGV[3], '+', 'COUNT', ARGV[4])
end
return {m[1], head, oldest, entries}
"""

# KEYS: meta, log, idem, idemz. ARGV: ttl ms. Keeps a watched topic's history alive
# (never brings back a topic that is gone).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS: cursor key. ARGV: epoch, offset, ttl ms
_SAVE_CURSOR = """
local cur = redis.call('HMGET', KEYS[1], 'e', 'o')
if cur[1] == ARGV[1] and tonumber(cur[2]) >= tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _now() -> float:
    """``anyio.current_time()`` on asyncio (the only backend of redis.asyncio), without
    looking the backend up: it is on every append's path, several times."""
    return asyncio.get_running_loop().time()


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def _int(value: Any) -> int:
    return int(_text(value))


class _Script:
    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        import hashlib

        self.body = body
        self.sha = hashlib.sha1(body.encode("utf-8")).hexdigest()


_APPEND_BATCH_SCRIPT = _Script(_APPEND_BATCH)
_STATE_SCRIPT = _Script(_STATE)
_CURSOR_SCRIPT = _Script(_SAVE_CURSOR)
_TOUCH_SCRIPT = _Script(_TOUCH)


class _State:
    """What the listener knows of one subscribed topic."""

    __slots__ = ("based", "channel", "epoch", "last", "ready")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.based = False  # baseline read after Redis confirmed the subscription
        self.epoch: str | None = None  # None: the topic did not exist at the baseline
        self.last = 0
        self.ready = anyio.Event()


if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout_at  # an anyio cancel scope costs ~10x more, on every command
else:  # pragma: no cover - Python 3.10

    @asynccontextmanager
    async def _deadline(when: float) -> AsyncIterator[None]:
        with anyio.fail_at(when):
            yield


_IDLE_CONNECTIONS = 16  # command connections kept open between commands, at most


@functools.cache
def _redis_errors() -> Any:
    """redis-py's exception classes (redis is imported lazily, once)."""
    import redis.exceptions

    return redis.exceptions


def _pack_in_python(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (str as UTF-8, bytes as is, numbers as text), in one buffer.

    redis-py's ``pack_command`` re-joins its buffer per argument (21 µs for a
    one-event append here, 195 µs for a batch of 50): this is linear.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif isinstance(arg, float):
            arg = repr(arg).encode("ascii")
        elif not isinstance(arg, bytes):
            raise TypeError(f"cannot send {type(arg).__name__} to Redis: {arg!r}")
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


@functools.cache
def _packer() -> Any:
    """hiredis's ``pack_command`` (C; the ``redis`` extra installs hiredis), else the same in Python."""
    try:
        from hiredis import pack_command
    except ImportError:
        return _pack_in_python
    return pack_command


async def _retry_pause(attempt: int) -> None:
    """Before a command's next attempt: 40 ms after the first, doubling, at most 0.5 s; jittered."""
    await anyio.sleep(min(0.5, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))


async def _drop(conn: AbstractConnection) -> None:
    """Close ``conn`` without waiting for Redis, even where the caller is cancelled."""
    with anyio.CancelScope(shield=True):
        await conn.disconnect(nowait=True)


def _at_eof(conn: AbstractConnection) -> bool:
    """Whether Redis closed this idle connection (a restart, its ``timeout``): nothing
    can be read from it any more, so it is reopened before a command is sent on it."""
    reader = getattr(conn, "_reader", None)
    return reader is None or reader.at_eof()


def _config(reply: Any) -> str:
    """The value of a one-parameter CONFIG GET reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    else:
        values = list(reply)[1::2]
    return _text(values[0]) if values else ""


def _parse_entries(topic: str, epoch: str, entries: Any) -> list[Event]:
    events = []
    for entry_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        events.append(
            Event(
                topic,
                epoch,
                _int(_text(entry_id).partition("-")[0]),
                _text(values[b"t"] if b"t" in values else values["t"]),
                _text(values[b"d"] if b"d" in values else values["d"]),
                _int(values[b"ms"] if b"ms" in values else values["ms"]),
            )
        )
    return events


def _parse_payload(topic: str, payload: bytes) -> list[Event]:
    epoch_b, first_b, ms_b, n_b, rest = payload.split(b"|", 4)
    epoch, first, ms, n = epoch_b.decode("ascii"), int(first_b), int(ms_b), int(n_b)
    events = []
    pos = 0
    for i in range(n):
        fields = []
        for _ in range(2):
            colon = rest.index(b":", pos)
            size = int(rest[pos:colon])
            if colon + 1 + size > len(rest):
                raise ValueError("truncated payload")
            fields.append(rest[colon + 1 : colon + 1 + size].decode("utf-8"))
            pos = colon + 1 + size
        events.append(Event(topic, epoch, first + i, fields[0], fields[1], ms))
    return events


_BATCH_EVENTS = 1000  # events per coalesced script call at most (an append is never split)


class _Append:
    """One waiting append: what to store, and (once settled) its events or its error."""

    __slots__ = ("batch", "deadline", "error", "events", "items", "key", "topic", "wake")

    def __init__(self, topic: str, items: Sequence[tuple[str, str]], key: str | None, deadline: float) -> None:
        self.topic = topic
        self.items = items
        self.key = key
        self.deadline = deadline
        # done when settled, or when handed a batch to send (a bare future: anyio's
        # Event and a cancel scope per queued append were a third of the CPU of
        # 50 concurrent publishers)
        self.wake: asyncio.Future[None] | None = None
        self.batch: list[_Append] | None = None  # the batch it was taken into
        self.events: list[Event] | None = None
        self.error: BaseException | None = None

    def result(self) -> list[Event]:
        if self.events is not None:
            return self.events
        error = self.error
        if isinstance(error, StoreUnavailable):
            raise StoreUnavailable(str(error)) from error
        if isinstance(error, StoreError):
            raise StoreError(str(error)) from error
        raise StoreError(f"Redis append failed: {error!r}") from error


def _give_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_exception(TimeoutError())


def _wake(request: _Append) -> None:
    wake = request.wake
    if wake is not None and not wake.done():  # done: woken already, or its wait was cancelled
        wake.set_result(None)


class RedisStore:
    """An event store on Redis (5.0+; Streams), shared by every process of an app.

    ``history_size``: events kept per topic (trimmed exactly). ``history_ttl``:
    seconds after a topic's last publish until its keys expire (``None``: never);
    an expired topic comes back in a new epoch. A topic with subscribers in a
    process connected to this Redis does not expire. ``prefix`` starts every key and
    channel. ``publish_timeout``: seconds within which any call that needs Redis
    returns or raises :class:`~starlette_replay.StoreUnavailable`. ``cursor_ttl``:
    seconds a server-side cursor is kept after its last save.
    ``health_check_interval``: seconds between pings on the live connection (a
    connection silent for twice that is reopened).

    Raises ``ValueError`` for a bad option, ``TypeError`` for a client without a
    connection pool (``RedisCluster`` is not supported yet), ``ImportError``
    without redis-py.
    ``RedisStore(client)`` uses an existing ``redis.asyncio.Redis``, which
    :meth:`aclose` leaves open; :meth:`from_url` makes and owns one. Either way
    live events use one extra connection of their own.
    """

    def __init__(
        self,
        client: Redis,
        *,
        history_size: int = 10_000,
        history_ttl: float | None = None,
        prefix: str = "replay",
        publish_timeout: float = 5.0,
        cursor_ttl: float = 30 * 24 * 3600,
        health_check_interval: float = 5.0,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(_MISSING_REDIS) from exc
        if not hasattr(client, "connection_pool"):
            raise TypeError(f"RedisStore needs a redis.asyncio.Redis client (not {type(client).__name__})")
        check_int("history_size", history_size)
        check_seconds("history_ttl", history_ttl, optional=True)
        for name, value in (
            ("publish_timeout", publish_timeout),
            ("cursor_ttl", cursor_ttl),
            ("health_check_interval", health_check_interval),
        ):
            check_seconds(name, value)
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, not {prefix!r}")
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.prefix = prefix
        self.publish_timeout = float(publish_timeout)
        self.cursor_ttl = cursor_ttl
        self.health_check_interval = float(health_check_interval)
        self._client = client
        self._owns_client = False  # from_url sets it
        self._ttl_ms = "0" if history_ttl is None else str(max(1, math.ceil(history_ttl * 1000)))
        self._cursor_ttl_ms = str(max(1, math.ceil(cursor_ttl * 1000)))
        self._sink: LiveSink | None = None
        self._topics: dict[str, _State] = {}  # subscribed topics
        self._by_channel: dict[str, str] = {}
        self._conn: AbstractConnection | None = None  # the pub/sub connection, when up
        self._expect: dict[str, deque[bool]] = {}  # channel -> confirmations due (True: subscribe)
        self._reading_since: float | None = None  # when the listener's pending read began
        self._closed = False
        self._idle: list[AbstractConnection] = []  # command connections between commands
        self._queues: dict[str, deque[_Append]] = {}  # topic -> appends waiting while one call is in flight
        #: times the listener (re)connected, and resets it had to call; for tests and metrics
        self.reconnects = 0
        self.resets = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        history_size: int = 10_000,
        history_ttl: float | None = None,
        prefix: str = "replay",
        publish_timeout: float = 5.0,
        cursor_ttl: float = 30 * 24 * 3600,
        health_check_interval: float = 5.0,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://[[user]:password@]host[:port][/db]``,
        ``rediss://...`` for TLS, ``unix:///path.sock?db=0``), closed by :meth:`aclose`.

        ``redis_options`` go to ``redis.asyncio.Redis.from_url``. The client's own
        retries are turned off: the store retries what is safe to retry, within
        ``publish_timeout``. Raises ``ImportError`` without redis-py, ``ValueError``
        for a bad option. Connects lazily (nothing is awaited here).
        """
        try:
            import redis.asyncio
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise ImportError(_MISSING_REDIS) from exc
        check_seconds("publish_timeout", publish_timeout)
        options: dict[str, Any] = {
            "socket_connect_timeout": min(float(publish_timeout), 5.0),
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(redis_options)
        client = redis.asyncio.Redis.from_url(url, **options)
        store = cls(
            client,
            history_size=history_size,
            history_ttl=history_ttl,
            prefix=prefix,
            publish_timeout=publish_timeout,
            cursor_ttl=cursor_ttl,
            health_check_interval=health_check_interval,
        )
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return (
            f"RedisStore(prefix={self.prefix!r}, history_size={self.history_size}, "
            f"history_ttl={self.history_ttl}, publish_timeout={self.publish_timeout})"
        )

    # --- keys ----------------------------------------------------------------------

    def _keys(self, topic: str) -> list[str]:
        base = f"{self.prefix}:{{{topic}}}:"
        return [base + "meta", base + "log", base + "idem", base + "idemz"]

    def _channel(self, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}:live"

    def _cursor_key(self, identity: str, topic: str) -> str:
        return f"{self.prefix}:{{{topic}}}:cursor:{identity}"

    # --- commands --------------------------------------------------------------------

    def _new_connection(self, **overrides: Any) -> AbstractConnection:
        """A connection of the store's own, with the client's settings but no socket
        timeout (``publish_timeout`` and the listener's watchdog bound every wait)."""
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(socket_timeout=None, health_check_interval=0, **overrides)
        if "maint_notifications_config" in kwargs:  # redis-py 8: cluster maintenance pushes, RESP3 only
            kwargs["maint_notifications_config"] = None
        kwargs.pop("maint_notifications_pool_handler", None)
        conn: AbstractConnection = pool.connection_class(**kwargs)
        return conn

    async def _execute(self, *args: Any, retry: bool = True, deadline: float | None = None) -> Any:
        """Run one command on one of the store's command connections, within ``publish_timeout``.

        Retries when the command cannot have reached Redis (no connection), and
        also after a send when ``retry`` says the command is safe to run twice.
        ``deadline`` (the event loop's clock) replaces ``publish_timeout`` from now.
        """
        errors = _redis_errors()
        lost = (errors.ConnectionError, errors.TimeoutError, OSError)  # no (complete) reply: retry if safe
        attempt = 0
        last_error: BaseException | None = None
        try:
            async with _deadline(_now() + self.publish_timeout if deadline is None else deadline):
                while True:
                    attempt += 1
                    idle = self._idle
                    conn = idle.pop() if idle else self._new_connection()
                    try:
                        if not conn.is_connected or _at_eof(conn):  # new, or closed by Redis while idle
                            await conn.disconnect(nowait=True)
                            await conn.connect()  # type: ignore[no-untyped-call]
                    except BaseException as exc:
                        await _drop(conn)
                        if not isinstance(exc, lost):
                            raise
                        last_error = exc
                        await _retry_pause(attempt)
                        continue
                    try:
                        await conn.send_packed_command(_packer()(args), check_health=False)
                        reply = await conn.read_response(disable_decoding=True)
                    except errors.ResponseError:
                        await self._release(conn)  # a complete reply: the connection stays usable
                        raise
                    except BaseException as exc:
                        await _drop(conn)
                        if not isinstance(exc, lost):
                            raise
                        last_error = exc
                        if not retry:
                            raise StoreUnavailable(
                                f"lost Redis while waiting for a reply (the write may or may not be stored): {exc}"
                            ) from exc
                    else:
                        await self._release(conn)
                        return reply
                    await _retry_pause(attempt)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"Redis did not answer within publish_timeout={self.publish_timeout}s (last error: {last_error!r})"
            ) from (last_error or exc)
        except errors.NoScriptError:
            raise  # for _eval, which then sends the script's body
        except errors.ResponseError as exc:
            raise StoreError(f"Redis refused {_text(args[0])}: {exc}") from exc
        except errors.RedisError as exc:
            raise StoreError(f"Redis failed: {exc}") from exc

    async def _release(self, conn: AbstractConnection) -> None:
        """Keep a connection that finished its exchange for the next command (a few at most)."""
        if not self._closed and len(self._idle) < _IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            await _drop(conn)

    async def _eval(
        self,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        retry: bool = True,
        deadline: float | None = None,
    ) -> Any:
        try:
            return await self._execute("EVALSHA", script.sha, len(keys), *keys, *args, retry=retry, deadline=deadline)
        except _redis_errors().NoScriptError:
            # not run: safe to send the body (it is cached for the next EVALSHA)
            return await self._execute("EVAL", script.body, len(keys), *keys, *args, retry=retry, deadline=deadline)

    # --- the log ---------------------------------------------------------------------

    async def append(
        self,
        topic: str,
        items: Sequence[tuple[str, str]],
        *,
        idempotency_key: str | None = None,
    ) -> list[Event]:
        """Store ``items`` atomically (one script) and publish them live.

        Returns the stored events (the first ones for a known ``idempotency_key``),
        once Redis has them. Concurrent appends to one topic are coalesced: while
        one script call for the topic is in flight, later appends queue, and the
        next call stores all of them in arrival order in one script (each append
        stays contiguous and atomic, each keeps its own idempotency key and gets
        its own events). Raises ``StoreUnavailable`` within ``publish_timeout``
        when Redis does not confirm: the events may then be stored or not; a retry
        with an ``idempotency_key`` is safe. An append that raises having never
        been sent says so ("not stored").

        Cancelling is safe: an append still queued is dropped (not stored); one
        already sent may be stored or not, as with a lost connection. Cancelling
        never affects other appends coalesced with it: a call already sending a
        batch shared with others finishes it (within ``publish_timeout``) before
        the cancellation takes effect, and may then return its stored events.
        """
        if not items:
            return []
        request = _Append(topic, items, idempotency_key, _now() + self.publish_timeout)
        queue = self._queues.get(topic)
        if queue is None:
            self._queues[topic] = deque()  # this call is the topic's sender now
            batch = [request]
        else:
            queue.append(request)
            loop = asyncio.get_running_loop()
            request.wake = wake = loop.create_future()
            # A safety net: the call in flight ends by its own (earlier) deadline, then
            # hands over. A bare timer, not a timeout scope: this is per queued append.
            net = loop.call_at(loop.time() + 2 * self.publish_timeout + 1, _give_up, wake)
            try:
                await wake
            except BaseException as exc:
                if request.batch is None:
                    queue.remove(request)  # never sent: nothing stored
                    if isinstance(exc, TimeoutError):
                        raise StoreUnavailable(f"not stored: no turn to append to {topic!r} in time") from exc
                elif request.batch[0] is request and request.events is None and request.error is None:
                    # handed the next batch as the wait ended: send it for the others
                    with anyio.CancelScope(shield=True):
                        await self._send_batch(topic, request.batch)
                    if isinstance(exc, TimeoutError):
                        return request.result()
                elif isinstance(exc, TimeoutError):
                    raise StoreUnavailable(f"Redis did not confirm an append to {topic!r} in time") from exc
                raise
            finally:
                net.cancel()
            if request.batch is None or request.batch[0] is not request:
                return request.result()  # settled by another call
            batch = request.batch
        await self._send_batch(topic, batch)
        return request.result()

    async def _send_batch(self, topic: str, batch: list[_Append]) -> None:
        """Store ``batch`` (one script call), settle each of its appends, hand the queue on.

        Shielded when others share the batch: a cancelled caller finishes it (within
        the first append's deadline); its cancellation takes effect afterwards.
        """
        try:
            try:
                if len(batch) == 1:
                    await self._store_batch(topic, batch)
                else:
                    with anyio.CancelScope(shield=True):
                        await self._store_batch(topic, batch)
            except Exception as exc:
                for request in batch:
                    if request.events is None and request.error is None:
                        request.error = exc
        finally:
            for request in batch:
                if request.events is None and request.error is None:  # only if the code above is wrong
                    request.error = StoreError("the append was interrupted")
                _wake(request)
            queue = self._queues.get(topic)
            if queue:
                taken: list[_Append] = []
                size = 0
                while queue and (not taken or size + len(queue[0].items) <= _BATCH_EVENTS):
                    request = queue.popleft()
                    taken.append(request)
                    size += len(request.items)
                taken[0].batch = taken
                for request in taken[1:]:
                    request.batch = taken
                _wake(taken[0])  # the first queued append sends the next batch
            elif queue is not None:
                del self._queues[topic]

    async def _store_batch(self, topic: str, batch: list[_Append]) -> None:
        deadline = batch[0].deadline  # the earliest: appends queue in order
        if batch[0].wake is not None and _now() >= deadline:  # it queued behind other appends
            raise StoreUnavailable(
                f"not stored: waited publish_timeout={self.publish_timeout}s behind other appends to {topic!r}"
            )
        args: list[Any] = [_new_epoch(), self.history_size, self._ttl_ms, self._channel(topic), len(batch)]
        for request in batch:
            args.append(request.key or "")
            args.append(len(request.items))
            for event_type, raw in request.items:
                args.append(event_type)
                args.append(raw)
        # A retry after the script was sent could store unkeyed events twice: only
        # a batch whose appends all have idempotency keys is retried.
        retry = all(request.key is not None for request in batch)
        reply = await self._eval(_APPEND_BATCH_SCRIPT, self._keys(topic), args, retry=retry, deadline=deadline)
        epoch, ms = _text(reply[0]), _int(reply[1])
        for request, result in zip(batch, reply[2:], strict=True):
            if isinstance(result, list):
                request.events = _parse_entries(topic, epoch, result)
            else:
                first = int(result)
                request.events = [
                    Event(topic, epoch, first + i, event_type, raw, ms)
                    for i, (event_type, raw) in enumerate(request.items)
                ]

    async def _state(self, topic: str, *, create: bool, after: int = 0, limit: int = 0) -> tuple[Position | None, Any]:
        epoch = _new_epoch() if create else ""
        reply = await self._eval(_STATE_SCRIPT, self._keys(topic), [epoch, self._ttl_ms, after + 1, limit])
        found = _text(reply[0])
        if not found:
            return None, []
        return Position(found, _int(reply[1]), _int(reply[2])), reply[3]

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` retained events of the current epoch after ``after``, in order.

        Raises ``StoreUnavailable``/``StoreError``; safe to cancel.
        """
        if limit <= 0:
            return []
        position, entries = await self._state(topic, create=False, after=max(after, 0), limit=limit)
        if position is None:
            return []
        return _parse_entries(topic, position.epoch, entries)

    async def position(self, topic: str) -> Position:
        """The topic's epoch, head and oldest retained offset (makes the epoch if missing).

        Raises ``StoreUnavailable``/``StoreError``; safe to cancel.
        """
        position, _ = await self._state(topic, create=True)
        assert position is not None
        return position

    # --- cursors ---------------------------------------------------------------------

    async def load_cursor(self, identity: str, topic: str) -> Cursor | None:
        """The cursor saved for ``identity`` on ``topic``, or ``None``. Safe to cancel."""
        reply = await self._execute("HMGET", self._cursor_key(identity, topic), "e", "o")
        if reply[0] is None or reply[1] is None:
            return None
        return Cursor(_text(reply[0]), _int(reply[1]))

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        """Save a cursor (forward-only within an epoch; another epoch replaces it).

        It expires ``cursor_ttl`` seconds after its last save. Safe to cancel.
        """
        await self._eval(
            _CURSOR_SCRIPT,
            [self._cursor_key(identity, topic)],
            [cursor.epoch, cursor.offset, self._cursor_ttl_ms],
        )

    # --- lifecycle -------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, sink: LiveSink) -> AsyncIterator[None]:
        """Check the server's durability settings and run the live listener for ``sink``.

        Redis being unreachable does not fail this (the check then takes up to
        ``publish_timeout``): the listener keeps trying, and publishes raise
        ``StoreUnavailable`` meanwhile.
        """
        if self._sink is not None:
            raise RuntimeError("this RedisStore is already connected to a hub")
        if self._closed:
            raise RuntimeError("this RedisStore is closed")
        self._sink = sink
        try:
            await self._check_durability()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen)
                if self.history_ttl is not None:
                    tg.start_soon(self._keep_watched_topics)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._sink = None
            self._topics.clear()
            self._by_channel.clear()
            conn, self._conn = self._conn, None
            if conn is not None:
                await _drop(conn)
            await self._close_idle()

    async def _close_idle(self) -> None:
        """Close the command connections kept between commands (a later command opens one)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)

    async def aclose(self) -> None:
        """Close the store's connections, and the client if this store made it
        (``from_url``). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._close_idle()
        if self._owns_client:
            with anyio.CancelScope(shield=True):
                await self._client.aclose()

    async def _check_durability(self) -> None:
        try:
            appendonly = _config(await self._execute("CONFIG", "GET", "appendonly"))
            policy = _config(await self._execute("CONFIG", "GET", "maxmemory-policy"))
        except StoreUnavailable as exc:
            logger.warning("Redis unreachable at startup (%s); live events start once it is back", exc)
            return
        except StoreError as exc:
            logger.warning(
                "cannot read Redis's persistence settings (%s); make sure the server runs with "
                "appendonly yes and maxmemory-policy noeviction, or events can be lost",
                exc,
            )
            return
        if appendonly != "yes":
            logger.warning(
                "Redis runs with appendonly=%s: acknowledged events are lost if Redis restarts "
                "(clients then get a new epoch); set appendonly yes for zero loss",
                appendonly or "?",
            )
        if policy != "noeviction":
            logger.warning(
                "Redis maxmemory-policy is %s: under memory pressure Redis may evict topic history "
                "(clients then get a new epoch); set maxmemory-policy noeviction for zero loss",
                policy or "?",
            )

    # --- live side -------------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        """Start live delivery of ``topic``; returns once Redis confirmed the subscription.

        Raises ``StoreUnavailable`` when that does not happen within
        ``publish_timeout``, and ``RuntimeError`` outside :meth:`connect`.
        Cancelling is safe: an unconfirmed subscription is dropped again.
        """
        if self._sink is None:
            raise RuntimeError("RedisStore.subscribe() needs the store connected (async with store.connect(sink))")
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _State(self._channel(topic))
            self._by_channel[state.channel] = topic
            conn = self._conn
            if conn is not None:
                await self._send(conn, "SUBSCRIBE", state.channel)
        try:
            with anyio.move_on_after(self.publish_timeout):
                await state.ready.wait()
        finally:
            if not state.ready.is_set() and self._topics.get(topic) is state:
                # not confirmed (timeout or cancelled): do not leave it subscribed behind the caller's back
                with anyio.CancelScope(shield=True):
                    await self.unsubscribe(topic)
        if not state.ready.is_set():
            raise StoreUnavailable(f"Redis did not confirm the subscription to {topic!r} within publish_timeout")

    async def unsubscribe(self, topic: str) -> None:
        """Stop live delivery of ``topic``. Never raises for a lost connection; safe to cancel."""
        state = self._topics.pop(topic, None)
        if state is None:
            return
        self._by_channel.pop(state.channel, None)
        conn = self._conn
        if conn is not None:
            await self._send(conn, "UNSUBSCRIBE", state.channel)

    async def _send(self, conn: AbstractConnection, *args: str) -> None:
        """Send on the pub/sub connection; a failure is the reader's to notice."""
        if args[0] in ("SUBSCRIBE", "UNSUBSCRIBE") and conn is self._conn:
            self._expect.setdefault(args[1], deque()).append(args[0] == "SUBSCRIBE")
        try:
            with anyio.fail_after(self.publish_timeout):
                await conn.send_packed_command(_packer()(args), check_health=False)
        except Exception as exc:
            logger.debug("sending %s on the pub/sub connection failed: %r", args[0], exc)
            await _drop(conn)

    async def _listen(self) -> None:
        redis_error = _redis_errors().RedisError
        failures = 0
        while True:
            connected = self.reconnects
            try:
                await self._listen_once()
            except Exception as exc:
                # a task group wraps the reader's error: log the error itself
                while len(getattr(exc, "exceptions", ())) == 1:
                    exc = exc.exceptions[0]  # type: ignore[attr-defined]
                if isinstance(exc, redis_error | StoreError | OSError):  # OSError: TimeoutError too
                    level = logging.WARNING if failures <= 1 else logging.DEBUG
                    logger.log(level, "Redis pub/sub connection lost (%r); reconnecting", exc)
                else:  # a bug: say so loudly, and keep serving
                    logger.error("the Redis listener failed; reconnecting", exc_info=exc)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    await _drop(conn)
            # Jittered, bounded backoff: 50 ms doubling up to 2 s, from the start
            # again once a connection was made (Redis is up: come back quickly).
            failures = 1 if self.reconnects != connected else failures + 1
            await anyio.sleep(min(2.0, 0.05 * 2 ** min(failures - 1, 6)) * random.uniform(0.5, 1.0))

    async def _listen_once(self) -> None:
        # RESP2: plain arrays for pub/sub (redis-py 8's RESP3 push path is another beast);
        # no read timeout (the pinger and the watchdog below see a dead link).
        conn = self._new_connection(protocol=2)
        try:
            with anyio.fail_after(self.publish_timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await _drop(conn)
            raise
        self._conn = conn
        self._expect = {}  # confirmations due on this connection
        self.reconnects += 1
        if self.reconnects > 1:
            logger.info("Redis pub/sub connection reopened; repairing %d topics", len(self._topics))
        for topic, state in list(self._topics.items()):
            if self._topics.get(topic) is state:  # not unsubscribed meanwhile
                await self._send(conn, "SUBSCRIBE", state.channel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, conn)
            while True:
                # No socket_timeout on this connection: the read blocks, _watch bounds it
                # (one timer for the connection, not a timed scope per message).
                self._reading_since = time.monotonic()
                reply = await conn.read_response(disable_decoding=True)
                self._reading_since = None
                await self._handle(reply)

    async def _keep_watched_topics(self) -> None:
        """Refresh ``history_ttl`` of topics with subscribers here, as MemoryStore never forgets them.

        Without it an idle topic that clients watch would expire, and its next
        event would close them (new epoch) although they missed nothing.
        """
        assert self.history_ttl is not None
        period = max(0.05, min(self.history_ttl / 3, 60.0))
        while True:
            await anyio.sleep(period)
            for topic in list(self._topics):
                try:
                    await self._eval(_TOUCH_SCRIPT, self._keys(topic), [self._ttl_ms])
                except StoreError as exc:
                    logger.debug("could not refresh the TTL of %r: %r", topic, exc)
                    break

    async def _watch(self, conn: AbstractConnection) -> None:
        """PING every ``health_check_interval``; a read waiting longer than two of them
        (plus a second) means a dead link: raise, and the listener reconnects."""
        limit = self.health_check_interval * 2 + 1
        while True:
            await anyio.sleep(self.health_check_interval)
            since = self._reading_since
            if since is not None and time.monotonic() - since > limit:
                raise TimeoutError(f"no reply on the Redis pub/sub connection for {limit:g}s")
            await self._send(conn, "PING")

    async def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return  # PONG outside subscribed mode
        kind = bytes(reply[0]).lower()
        if kind == b"message":
            topic = self._by_channel.get(_text(reply[1]))
            if topic is None:
                return
            state = self._topics[topic]
            if not state.based:
                return  # from before this subscription was confirmed
            try:
                events = _parse_payload(topic, bytes(reply[2]))
            except ValueError:
                # not ours (someone else published on the channel): the stream is the truth
                logger.warning("ignoring a malformed message on %s", _text(reply[1]))
                return
            # Delivering may send to every local subscriber from this task (inline
            # sends): let the tasks that are ready run first, so that a publisher's
            # next append goes out to Redis before those sends, not after them.
            await asyncio.sleep(0)
            for event in events:
                await self._offer(topic, state, event)
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = _text(reply[1])
            due = self._expect.get(channel)
            if due:
                due.popleft()
                if due:
                    return  # a later (un)subscribe is still on its way
                del self._expect[channel]
            topic = self._by_channel.get(channel)
            if kind == b"subscribe" and topic is not None:
                await self._confirmed(topic, self._topics[topic])

    async def _confirmed(self, topic: str, state: _State) -> None:
        """Redis confirmed ``topic``: set its baseline, or repair it after a reconnect."""
        position, _ = await self._state(topic, create=False)
        if self._topics.get(topic) is not state:
            return
        if not state.based:
            state.based = True
            if position is not None:
                state.epoch, state.last = position.epoch, position.head
            state.ready.set()
            return
        if position is None:
            if state.epoch is not None:
                self._reset(topic, state, "topic history lost in Redis", None, 0)
            return
        if state.epoch is None:
            state.epoch = position.epoch
        elif position.epoch != state.epoch:
            self._reset(topic, state, "topic epoch changed", position.epoch, position.head)
            return
        elif position.head < state.last:
            # Same epoch, older head: Redis lost writes it had acknowledged (a failover
            # or an old AOF). Offsets will be reused; the clients must hear of it.
            self._reset(topic, state, "Redis lost acknowledged events (head moved back)", position.epoch, position.head)
            return
        if position.head > state.last:
            await self._repair(topic, state, position.head)

    def _reset(self, topic: str, state: _State, reason: str, epoch: str | None, last: int) -> None:
        self.resets += 1
        state.epoch, state.last = epoch, last
        logger.warning("cannot vouch for live events of %r: %s", topic, reason)
        if self._sink is not None:
            self._sink.reset(topic, reason)

    async def _offer(self, topic: str, state: _State, event: Event) -> None:
        if state.epoch != event.epoch:
            if state.epoch is None:
                state.epoch, state.last = event.epoch, 0
            else:
                self._reset(topic, state, "topic epoch changed", event.epoch, event.offset - 1)
        if event.offset <= state.last:
            return
        if event.offset > state.last + 1:
            await self._repair(topic, state, event.offset - 1)
            if self._topics.get(topic) is not state or state.epoch != event.epoch or event.offset <= state.last:
                return
        state.last = event.offset
        self._deliver(event)

    async def _repair(self, topic: str, state: _State, upto: int) -> None:
        """Deliver ``state.last + 1 .. upto`` from the stream, or reset the topic."""
        epoch = state.epoch
        while state.last < upto:
            position, entries = await self._state(
                topic, create=False, after=state.last, limit=min(500, upto - state.last)
            )
            if self._topics.get(topic) is not state:
                return
            events = [] if position is None else _parse_entries(topic, position.epoch, entries)
            if position is None or position.epoch != epoch or not events or events[0].offset != state.last + 1:
                self._reset(topic, state, "live events missed and no longer retained", epoch, upto)
                return
            for event in events:
                if event.offset > upto:
                    break
                if event.offset != state.last + 1:  # a hole inside the stream (XDEL)
                    self._reset(topic, state, "live events missed and no longer retained", epoch, upto)
                    return
                state.last = event.offset
                self._deliver(event)

    def _deliver(self, event: Event) -> None:
        sink = self._sink
        if sink is not None:
            sink.deliver(event)
