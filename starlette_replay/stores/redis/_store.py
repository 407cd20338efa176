"""RedisStore: the store, its keys, its options and its lifecycle.

Its parts live beside it: ``_pipeline`` (pipelined commands on a few
connections), ``_appends`` (concurrent appends to one topic coalesced),
``_listener`` (the pub/sub side), ``_scripts`` with the ``.lua`` files, and
``_codec`` (packing and parsing); on a Redis Cluster, ``_cluster`` (routing
by slot, following the topology) and ``_shards`` (a listener per primary).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from ..._checks import check_int, check_seconds
from ...errors import StoreError, StoreUnavailable
from ...events import Event
from ..base import Cursor, Health, LiveSink, Position
from . import _scripts
from ._appends import Append, Coalescer
from ._cluster import Address, Routes
from ._codec import config_value, packer, parse_entries, redis_errors, text, to_int
from ._health import Probe
from ._listener import Listener
from ._pipeline import NotSent, Pipelines, ReplyLost
from ._shards import ShardedListener

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.connection import AbstractConnection

__all__ = ["RedisStore"]

logger = logging.getLogger("starlette_replay.stores.redis")

_MISSING_REDIS = "RedisStore needs redis-py: pip install 'starlette-replay[redis]'"


def _now() -> float:
    """``anyio.current_time()`` on asyncio (the only backend of redis.asyncio), without
    looking the backend up: it is on every append's path, several times."""
    return asyncio.get_running_loop().time()


def _new_epoch() -> str:
    """16 hex digits from the OS's CSPRNG (as ``secrets.token_hex(8)``, minus its
    three Python layers: one is made for every append)."""
    return os.urandom(8).hex()


def _is_cluster(client: object) -> bool:
    try:
        from redis.asyncio.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis-py without asyncio cluster support
        return False
    return isinstance(client, RedisCluster)


def _retry_pause(attempt: int) -> float:
    """Seconds before a command's next attempt: 40 ms after the first, doubling, at most 0.5 s; jittered."""
    return float(min(0.5, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))


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
    connection silent for twice that is reopened); the health probe
    (:meth:`health`) runs every fifth of it. ``connections``: how many
    connections carry the store's commands, pipelined (any number of commands
    in flight on each); the live side uses one more. So a process holds at most
    ``connections + 1`` connections to Redis, whatever the number of topics,
    publishers and subscribers.

    Raises ``ValueError`` for a bad option, ``TypeError`` for a client that is
    neither a ``Redis`` (with a connection pool) nor a ``RedisCluster``,
    ``ImportError`` without redis-py.
    ``RedisStore(client)`` takes an existing ``redis.asyncio.Redis`` for its
    settings (address, credentials, TLS, database, protocol), opens connections
    of its own with them (none from the client's pool), and :meth:`aclose`
    leaves the client open; :meth:`from_url` makes and owns one.

    A ``redis.asyncio.RedisCluster`` (Redis 7.0+: live events use sharded
    pub/sub) makes it a cluster store: each topic's commands go to the primary
    of its slot, on ``connections`` pipelined connections per primary, and the
    live side holds one pub/sub connection per primary;
    the store follows fail-overs and slot migrations (see ``_cluster`` and
    ``_shards``). :meth:`connect` raises ``StoreError`` when the cluster has no
    sharded pub/sub.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        history_size: int = 10_000,
        history_ttl: float | None = None,
        prefix: str = "replay",
        publish_timeout: float = 5.0,
        cursor_ttl: float = 30 * 24 * 3600,
        health_check_interval: float = 5.0,
        connections: int = 4,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(_MISSING_REDIS) from exc
        cluster = _is_cluster(client)
        if not cluster and not hasattr(client, "connection_pool"):
            raise TypeError(
                f"RedisStore needs a redis.asyncio.Redis or RedisCluster client (not {type(client).__name__})"
            )
        check_int("history_size", history_size)
        check_int("connections", connections)
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
        self.connections = connections
        self._client = client
        self._owns_client = False  # from_url sets it
        self._ttl_ms = "0" if history_ttl is None else str(max(1, math.ceil(history_ttl * 1000)))
        self._cursor_ttl_ms = str(max(1, math.ceil(cursor_ttl * 1000)))
        self._connected = False
        self._closed = False
        self._appends = Coalescer(self._store_batch, self.publish_timeout)
        self._pipes = Pipelines(
            self._new_connection,
            size=connections,
            connect_timeout=self.publish_timeout,
            stall_after=self.publish_timeout,
        )
        self._routes: Routes | None = None  # on a cluster: a Pipelines per primary instead
        self._listener: Listener | ShardedListener
        if cluster:
            self._publish_command = "SPUBLISH"
            self._routes = Routes(
                client,  # type: ignore[arg-type]
                self._new_connection,
                size=connections,
                connect_timeout=self.publish_timeout,
                stall_after=self.publish_timeout,
            )
            self._listener = ShardedListener(
                self._routes,
                # RESP2: plain arrays for pub/sub (redis-py 8's RESP3 push path is another beast)
                new_connection=lambda address: self._new_connection(address, protocol=2),
                read_state=self._read_state,
                channel=self._channel,
                publish_timeout=self.publish_timeout,
                health_check_interval=self.health_check_interval,
            )
        else:
            self._publish_command = "PUBLISH"
            self._listener = Listener(
                # RESP2: plain arrays for pub/sub (redis-py 8's RESP3 push path is another beast)
                new_connection=lambda: self._new_connection(protocol=2),
                read_state=self._read_state,
                channel=self._channel,
                publish_timeout=self.publish_timeout,
                health_check_interval=self.health_check_interval,
            )
        self._probe = Probe(
            prefix=prefix,
            publish=lambda channel, message: self._execute("PUBLISH", channel, message),
            interval=self.health_check_interval / 5,
            stall_after=self.health_check_interval,
        )
        self._listener.probe = self._probe

    @property
    def cluster(self) -> bool:
        """True on a Redis Cluster."""
        return self._routes is not None

    @property
    def reconnects(self) -> int:
        """Times the live side (re)connected to Redis (for tests and metrics)."""
        return self._listener.reconnects

    @property
    def resets(self) -> int:
        """Topics the live side reset: it could not vouch for their continuity."""
        return self._listener.resets

    @property
    def commands_in_flight(self) -> int:
        """Commands sent to Redis (or about to be) and not answered yet (for metrics; on a
        cluster, over every node)."""
        if self._routes is not None:
            return self._routes.in_flight
        return self._pipes.in_flight

    def health(self) -> Health:
        """Ready while Redis answers the store's probe and the listener receives it (see ``_health``).

        A probe is published every ``health_check_interval / 5`` s while
        :meth:`connect` is entered; either side silent for
        ``health_check_interval`` s is not ready. No I/O; never raises.
        """
        return self._probe.health()

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
        connections: int = 4,
        cluster: bool = False,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on a new client for ``url`` (``redis://[[user]:password@]host[:port][/db]``,
        ``rediss://...`` for TLS, ``unix:///path.sock?db=0``), closed by :meth:`aclose`.

        ``cluster=True``: a Redis Cluster, ``url`` naming any of its nodes
        (``redis.asyncio.RedisCluster.from_url``; db 0 only). ``redis_options``
        go to the client's ``from_url``. The client's own retries are turned off:
        the store retries what is safe to retry, within ``publish_timeout``.
        Raises ``ImportError`` without redis-py, ``ValueError`` for a bad option.
        Connects lazily (nothing is awaited here).
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
        client: Redis | RedisCluster
        if cluster:
            # Its own command path is unused (the store routes and retries); its
            # connections only load the slot map, within socket_connect_timeout.
            client = redis.asyncio.RedisCluster.from_url(url, **options)
        else:
            client = redis.asyncio.Redis.from_url(url, **options)
        store = cls(
            client,
            history_size=history_size,
            history_ttl=history_ttl,
            prefix=prefix,
            publish_timeout=publish_timeout,
            cursor_ttl=cursor_ttl,
            health_check_interval=health_check_interval,
            connections=connections,
        )
        store._owns_client = True
        return store

    def __repr__(self) -> str:
        return (
            f"RedisStore({'cluster, ' if self.cluster else ''}prefix={self.prefix!r}, "
            f"history_size={self.history_size}, "
            f"history_ttl={self.history_ttl}, publish_timeout={self.publish_timeout}, "
            f"connections={self.connections})"
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

    def _new_connection(self, address: Address | None = None, **overrides: Any) -> AbstractConnection:
        """A connection of the store's own, with the client's settings but no socket
        timeout (``publish_timeout`` and the listener's watchdog bound every wait);
        on a cluster, to the node at ``address``."""
        if address is None:
            pool = self._client.connection_pool  # type: ignore[union-attr]
            kwargs = dict(pool.connection_kwargs)
            connection_class = pool.connection_class
        else:
            # Any node's settings: a node that a MOVED named may be new to the client.
            cluster: RedisCluster = self._client  # type: ignore[assignment]
            node = cluster.get_node(host=address[0], port=address[1]) or cluster.get_default_node()
            kwargs = dict(node.connection_kwargs)
            kwargs.update(host=address[0], port=address[1])
            connection_class = node.connection_class
        kwargs.update(socket_timeout=None, health_check_interval=0, **overrides)
        if "maint_notifications_config" in kwargs:  # redis-py 8: cluster maintenance pushes, RESP3 only
            kwargs["maint_notifications_config"] = None
        kwargs.pop("maint_notifications_pool_handler", None)
        kwargs.pop("oss_cluster_maint_notifications_handler", None)
        conn: AbstractConnection = connection_class(**kwargs)
        return conn

    async def _execute(
        self,
        *args: Any,
        key: str | None = None,
        node: Address | None = None,
        script: _scripts.Script | None = None,
        retry: bool = True,
        deadline_at: float | None = None,
    ) -> Any:
        """Run one command on the pipelined connections, within ``publish_timeout``.

        With ``script``, ``args`` are its ``numkeys, *keys, *argv``: it is sent
        by SHA (``EVALSHA``), and by its body once when Redis does not know it.
        ``key`` routes it on a cluster (the primary of its slot; None: any), or
        ``node`` names the cluster node it goes to.
        Sends the command again when it cannot have reached Redis
        (:class:`NotSent`) or did not run there (a cluster's ``MOVED``, ``ASK``,
        ``TRYAGAIN``, ``CLUSTERDOWN``), and also after its reply was lost when
        ``retry`` says it is safe to run twice. ``deadline_at`` (the event loop's
        clock) replaces ``publish_timeout`` from now. Raises
        ``StoreUnavailable`` (no answer in time, a lost reply that is not
        retried) or ``StoreError`` (Redis refused it). Cancelling is safe (see
        ``Pipelines.call``).
        """
        errors = redis_errors()
        pack = packer()
        command = ("EVALSHA", script.sha, *args) if script is not None else args
        packed = pack(command)
        end = _now() + self.publish_timeout if deadline_at is None else deadline_at
        routes = self._routes
        ask: Address | None = None
        attempt = 0
        last_error: BaseException | None = None
        try:
            while True:
                attempt += 1
                try:
                    if routes is None:
                        return await self._pipes.call(packed, end)
                    target, ask = ask, None
                    return await routes.call(packed, end, key, target, node=node)
                except ReplyLost as exc:
                    last_error = exc
                    if routes is not None:
                        routes.refresh_soon()
                    if not retry:
                        raise StoreUnavailable(
                            f"lost Redis while waiting for a reply (the write may or may not be stored): {exc}"
                        ) from exc
                except NotSent as exc:
                    last_error = exc
                    if self._closed:
                        raise StoreUnavailable(f"not sent: this RedisStore is closed ({exc})") from exc
                    if routes is not None:
                        routes.refresh_soon()  # the node may be gone: find who holds its slots now
                except errors.NoScriptError:
                    if script is None or command[0] == "EVAL":
                        raise
                    # not run: safe to send the body (Redis caches it for the next EVALSHA)
                    command = ("EVAL", script.body, *args)
                    packed = pack(command)
                    continue
                except errors.AskError as exc:  # MOVED too (a subclass): the command did not run
                    if routes is None:
                        raise
                    last_error = exc
                    if isinstance(exc, errors.MovedError):
                        routes.moved(exc.slot_id, exc.host, exc.port)
                    else:
                        ask = (exc.host, int(exc.port))
                    if attempt <= 3:
                        continue  # at once; later on (nodes that disagree) after a pause
                except (errors.TryAgainError, errors.ClusterDownError) as exc:
                    if routes is None:
                        raise
                    # not run: a migration in progress, or a shard without a primary for now
                    last_error = exc
                    if isinstance(exc, errors.ClusterDownError):
                        routes.refresh_soon()
                pause = _retry_pause(attempt)
                if _now() + pause >= end:
                    raise TimeoutError
                await anyio.sleep(pause)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"Redis did not answer within publish_timeout={self.publish_timeout}s (last error: {last_error!r})"
            ) from (last_error or exc)
        except errors.ResponseError as exc:
            raise StoreError(f"Redis refused {text(command[0])}: {exc}") from exc
        except errors.RedisError as exc:
            raise StoreError(f"Redis failed: {exc}") from exc

    async def _eval(
        self,
        script: _scripts.Script,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        retry: bool = True,
        deadline_at: float | None = None,
    ) -> Any:
        return await self._execute(
            len(keys), *keys, *args, key=keys[0], script=script, retry=retry, deadline_at=deadline_at
        )

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
        its own events); different topics' calls are pipelined together. Raises
        ``StoreUnavailable`` within ``publish_timeout`` when Redis does not
        confirm: the events may then be stored or not; a retry with an
        ``idempotency_key`` is safe. An append that raises having never been sent
        says so ("not stored").

        Cancelling is safe: an append still queued is dropped (not stored); one
        already sent may be stored or not, as with a lost connection. Cancelling
        never affects other appends coalesced with it: a call already sending a
        batch shared with others finishes it (within ``publish_timeout``) before
        the cancellation takes effect, and may then return its stored events.
        """
        if not items:
            return []
        return await self._appends.append(topic, items, idempotency_key)

    async def _store_batch(self, topic: str, batch: list[Append]) -> None:
        deadline_at = batch[0].deadline  # the earliest: appends queue in order
        if batch[0].wake is not None and _now() >= deadline_at:  # it queued behind other appends
            raise StoreUnavailable(
                f"not stored: waited publish_timeout={self.publish_timeout}s behind other appends to {topic!r}"
            )
        channel = self._channel(topic)
        args: list[Any] = [_new_epoch(), self.history_size, self._ttl_ms, channel, self._publish_command, len(batch)]
        for request in batch:
            args.append(request.key or "")
            args.append(len(request.items))
            for event_type, raw in request.items:
                args.append(event_type)
                args.append(raw)
        # A retry after the script was sent could store unkeyed events twice: only
        # a batch whose appends all have idempotency keys is retried.
        retry = all(request.key is not None for request in batch)
        keys = self._keys(topic)
        reply = await self._execute(
            4, *keys, *args, key=keys[0], script=_scripts.APPEND, retry=retry, deadline_at=deadline_at
        )
        epoch, ms = text(reply[0]), to_int(reply[1])
        for request, result in zip(batch, reply[2:], strict=True):
            if isinstance(result, list):
                request.events = parse_entries(topic, epoch, result)
            else:
                first = int(result)
                request.events = [
                    Event(topic, epoch, first + i, event_type, raw, ms)
                    for i, (event_type, raw) in enumerate(request.items)
                ]

    async def _state(self, topic: str, *, create: bool, after: int = 0, limit: int = 0) -> tuple[Position | None, Any]:
        epoch = _new_epoch() if create else ""
        reply = await self._eval(_scripts.STATE, self._keys(topic), [epoch, self._ttl_ms, after + 1, limit])
        found = text(reply[0])
        if not found:
            return None, []
        return Position(found, to_int(reply[1]), to_int(reply[2])), reply[3]

    async def _read_state(self, topic: str, after: int, limit: int) -> tuple[Position | None, Any]:
        """For the listener: a topic's position and up to ``limit`` entries after ``after``."""
        return await self._state(topic, create=False, after=after, limit=limit)

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` retained events of the current epoch after ``after``, in order.

        Raises ``StoreUnavailable``/``StoreError``; safe to cancel.
        """
        if limit <= 0:
            return []
        position, entries = await self._state(topic, create=False, after=max(after, 0), limit=limit)
        if position is None:
            return []
        return parse_entries(topic, position.epoch, entries)

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
        key = self._cursor_key(identity, topic)
        reply = await self._execute("HMGET", key, "e", "o", "t", key=key)
        if reply[0] is None or reply[1] is None:
            return None
        return Cursor(text(reply[0]), to_int(reply[1]), None if reply[2] is None else to_int(reply[2]))

    async def save_cursor(self, identity: str, topic: str, cursor: Cursor) -> None:
        """Save a cursor (forward-only within an epoch; another epoch replaces it).

        It expires ``cursor_ttl`` seconds after its last save. Safe to cancel.
        """
        await self._eval(
            _scripts.SAVE_CURSOR,
            [self._cursor_key(identity, topic)],
            [cursor.epoch, cursor.offset, self._cursor_ttl_ms, "" if cursor.time is None else cursor.time],
        )

    # --- lifecycle -------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, sink: LiveSink) -> AsyncIterator[None]:
        """Check the server's durability settings and run the live listener for ``sink``.

        Redis being unreachable does not fail this (the check then takes up to
        ``publish_timeout``): the listener keeps trying, and publishes raise
        ``StoreUnavailable`` meanwhile. Leaving it closes the store's connections
        (a later command opens them again).
        """
        if self._connected:
            raise RuntimeError("this RedisStore is already connected to a hub")
        if self._closed:
            raise RuntimeError("this RedisStore is closed")
        self._connected = True
        self._listener.sink = sink
        try:
            await self._check_server()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listener.run)
                tg.start_soon(self._probe.run)
                if self.history_ttl is not None:
                    tg.start_soon(self._keep_watched_topics)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._connected = False
            self._listener.sink = None
            self._listener.clear()
            with anyio.CancelScope(shield=True):
                await self._close_connections()

    async def _close_connections(self) -> None:
        if self._routes is not None:
            self._routes.closed = self._closed
            await self._routes.aclose()
        await self._pipes.aclose()

    async def aclose(self) -> None:
        """Close the store's connections, and the client if this store made it
        (``from_url``). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._pipes.closed = True
        with anyio.CancelScope(shield=True):
            await self._close_connections()
            if self._owns_client:
                await self._client.aclose()

    async def _check_server(self) -> None:
        """Warn about settings that can lose events (on every primary of a cluster); on a
        cluster, raise ``StoreError`` without sharded pub/sub (Redis < 7.0). Unreachable:
        warn, check nothing."""
        nodes: list[Address | None] = [None]
        if self._routes is not None:
            try:
                reply = await self._execute("COMMAND", "INFO", "SPUBLISH")
            except StoreUnavailable as exc:
                logger.warning("Redis unreachable at startup (%s); live events start once it is back", exc)
                return
            if not reply or reply[0] is None:
                raise StoreError(
                    "RedisStore on a Redis Cluster needs Redis 7.0 or later: live events use sharded "
                    "pub/sub (SPUBLISH, SSUBSCRIBE), which this cluster does not have"
                )
            nodes = list(self._routes.primaries())
        for node in nodes:
            await self._check_durability(node)

    async def _check_durability(self, node: Address | None) -> None:
        where = "" if node is None else f" on {node[0]}:{node[1]}"
        try:
            appendonly = config_value(await self._execute("CONFIG", "GET", "appendonly", node=node))
            policy = config_value(await self._execute("CONFIG", "GET", "maxmemory-policy", node=node))
        except StoreUnavailable as exc:
            logger.warning("Redis unreachable at startup (%s); live events start once it is back", exc)
            return
        except StoreError as exc:
            logger.warning(
                "cannot read Redis's persistence settings%s (%s); make sure the server runs with "
                "appendonly yes and maxmemory-policy noeviction, or events can be lost",
                where,
                exc,
            )
            return
        if appendonly != "yes":
            logger.warning(
                "Redis runs with appendonly=%s%s: acknowledged events are lost if Redis restarts "
                "(clients then get a new epoch); set appendonly yes for zero loss",
                appendonly or "?",
                where,
            )
        if policy != "noeviction":
            logger.warning(
                "Redis maxmemory-policy is %s%s: under memory pressure Redis may evict topic history "
                "(clients then get a new epoch); set maxmemory-policy noeviction for zero loss",
                policy or "?",
                where,
            )

    # --- live side -------------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        """Start live delivery of ``topic``; returns once Redis confirmed the subscription.

        Raises ``StoreUnavailable`` when that does not happen within
        ``publish_timeout``, and ``RuntimeError`` outside :meth:`connect`.
        Cancelling is safe: an unconfirmed subscription is dropped again.
        """
        if not self._connected:
            raise RuntimeError("RedisStore.subscribe() needs the store connected (async with store.connect(sink))")
        await self._listener.subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop live delivery of ``topic``. Never raises for a lost connection; safe to cancel."""
        self._listener.unsubscribe(topic)

    async def _keep_watched_topics(self) -> None:
        """Refresh ``history_ttl`` of topics with subscribers here, as MemoryStore never forgets them.

        Without it an idle topic that clients watch would expire, and its next
        event would close them (new epoch) although they missed nothing.
        """
        assert self.history_ttl is not None
        period = max(0.05, min(self.history_ttl / 3, 60.0))
        while True:
            await anyio.sleep(period)
            for topic in list(self._listener.topics):
                try:
                    await self._eval(_scripts.TOUCH, self._keys(topic), [self._ttl_ms])
                except StoreError as exc:
                    logger.debug("could not refresh the TTL of %r: %r", topic, exc)
                    break
