"""Redis Cluster: where each topic's commands go, and how the store follows the topology.

Every key of a topic and its live channel share the hash tag ``{<topic>}``, so
one slot, so one primary: every script runs on one node. ``Routes`` keeps one
:class:`~._pipeline.Pipelines` per primary (a few pipelined connections each)
and picks it by the slot of the command's key, from redis-py's slot map
(``RedisCluster.get_node_from_key``, its public API). It follows the topology:

* ``MOVED``: the slot lives elsewhere now. The node it names takes the slot at
  once (until the next refresh of the map) and the map is refreshed in the
  background; the command is sent again there (it did not run).
* ``ASK``: the slot is being migrated and this key is already on the target:
  ``ASKING`` and the command go to the target as one call expecting two
  replies (see ``Pipelines.call``); the slot stays where it was.
* ``TRYAGAIN`` (a migration in progress), ``CLUSTERDOWN``, a node that cannot
  be reached: the store retries within its deadline; the last two also
  refresh the map (a primary that died is replaced by its replica within
  ``cluster-node-timeout`` and a little more).

The refresh is redis-py's own (``RedisCluster.nodes_manager.initialize()``:
``CLUSTER SLOTS`` from the nodes it knows, one refresh at a time); a test pins
that attribute. After each refresh ``Routes`` tells whoever listens (the
sharded listener, to move topics whose slot now lives on another primary).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._pipeline import NotSent, Pipelines

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection

__all__ = ["ASKING", "Address", "Routes", "key_slot"]

logger = logging.getLogger("starlette_replay.stores.redis.cluster")

Address = tuple[str, int]

#: ``ASKING`` in RESP, sent before a command redirected by ``ASK``
ASKING = b"*1\r\n$6\r\nASKING\r\n"


def key_slot(key: str) -> int:
    """The cluster slot of ``key`` (its hash tag's, when it has one)."""
    from redis.crc import key_slot as crc_slot

    return int(crc_slot(key.encode("utf-8")))


class Routes:
    """The primaries of a Redis Cluster, a :class:`Pipelines` for each, chosen by slot."""

    def __init__(
        self,
        client: RedisCluster,
        new_connection: Callable[[Address], AbstractConnection],
        *,
        size: int,
        connect_timeout: float,
        stall_after: float,
    ) -> None:
        self.client = client
        self._new_connection = new_connection
        self.size = size
        self.connect_timeout = connect_timeout
        self.stall_after = stall_after
        self._pipes: dict[Address, Pipelines] = {}
        self._moved: dict[int, Address] = {}  # slot -> where a MOVED said it lives, until the next refresh
        self._initialized = False
        self._init_lock: asyncio.Lock | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_again = False
        self.closed = False
        #: called after every refresh of the slot map (synchronously, in the refresh's task)
        self.on_change: list[Callable[[], None]] = []
        #: refreshes of the slot map done (for tests and metrics)
        self.refreshes = 0

    # --- the slot map -----------------------------------------------------------------

    async def ready(self) -> None:
        """Load the slot map once (``RedisCluster.initialize()``). Raises redis-py's errors."""
        if self._initialized:
            return
        if self._init_lock is None:
            self._init_lock = asyncio.Lock()
        async with self._init_lock:
            if not self._initialized:
                # redis-py 8.1 failed concurrent first commands until initialize() ran (traps.md)
                await self.client.initialize()
                self._initialized = True

    def address_of(self, key: str | None) -> Address:
        """The primary that holds ``key``'s slot (``None``: any primary). Raises :class:`NotSent`
        while the map is not loaded or does not cover the slot."""
        if not self._initialized:
            raise NotSent("the cluster's slot map is not loaded yet")
        node: Any
        if key is None:
            node = self.client.get_default_node()
        else:
            moved = self._moved.get(key_slot(key))
            if moved is not None:
                return moved
            try:
                node = self.client.get_node_from_key(key)
            except Exception as exc:  # SlotNotCoveredError: a primary died and no replica took over yet
                raise NotSent(f"no cluster node serves the slot of {key!r} now ({exc})") from exc
        if node is None:
            raise NotSent(f"no cluster node serves {key!r} now")
        return (node.host, int(node.port))

    def primaries(self) -> list[Address]:
        """The primaries of the current map."""
        return [(node.host, int(node.port)) for node in self.client.get_primaries()]

    def moved(self, slot: int, host: str, port: int) -> None:
        """A ``MOVED`` reply: the slot lives at ``host:port`` now; refresh the map in the background."""
        self._moved[slot] = (host, int(port))
        self.refresh_soon()

    def refresh_soon(self) -> None:
        """Refresh the slot map in a task of its own (one at a time; a request made while
        one runs makes it run once more), then tell ``on_change``. Never raises."""
        if self.closed or not self._initialized:
            return
        if self._refresh is not None and not self._refresh.done():
            self._refresh_again = True
            return
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_map(), name="starlette_replay slot map")

    async def refreshed(self) -> None:
        """Wait for the refresh in progress, if any (for tests)."""
        while self._refresh is not None and not self._refresh.done():
            await asyncio.shield(self._refresh)

    async def _refresh_map(self) -> None:
        failures = 0
        while True:
            self._refresh_again = False
            try:
                async with asyncio.timeout(self.connect_timeout + 1):
                    await self.client.nodes_manager.initialize()
            except Exception as exc:  # every node it knows unreachable: try again
                failures += 1
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cannot refresh the Redis Cluster slot map (%r); retrying",
                    exc,
                )
                await asyncio.sleep(min(1.0, 0.05 * 2**failures) * random.uniform(0.5, 1.0))
                continue
            self.refreshes += 1
            self._moved.clear()
            for callback in list(self.on_change):
                try:
                    callback()
                except Exception:  # a bug in a listener must not stop the routing
                    logger.exception("a slot map listener failed")
            if not self._refresh_again:
                return
            await asyncio.sleep(0.05)  # asked again during the refresh: once more, soon

    # --- commands ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Commands submitted to every node's connections and not answered yet."""
        return sum(pipes.in_flight for pipes in self._pipes.values())

    def pipes(self, address: Address) -> Pipelines:
        """The pipelined connections to one node (opened on first use)."""
        pipes = self._pipes.get(address)
        if pipes is None:
            pipes = self._pipes[address] = Pipelines(
                lambda: self._new_connection(address),
                size=self.size,
                connect_timeout=self.connect_timeout,
                stall_after=self.stall_after,
            )
        return pipes

    async def call(
        self,
        packed: bytes,
        deadline: float,
        key: str | None,
        ask: Address | None = None,
        *,
        node: Address | None = None,
    ) -> Any:
        """Send one packed command to the primary of ``key``'s slot (or, with ``ask``, to that
        node after ``ASKING``; or to ``node``); returns its raw reply. Raises as ``Pipelines.call``."""
        if self.closed:
            raise NotSent("the store is closed")
        if not self._initialized:
            try:
                async with asyncio.timeout_at(deadline):
                    await self.ready()
            except TimeoutError:
                raise
            except Exception as exc:  # no node it knows answers: the command was not sent
                raise NotSent(f"cannot load the Redis Cluster slot map: {exc!r}") from exc
        if ask is not None:
            return await self.pipes(ask).call(ASKING + packed, deadline, replies=2)
        return await self.pipes(node or self.address_of(key)).call(packed, deadline)

    async def aclose(self) -> None:
        """Close every node's connections and stop refreshing (a later call opens new ones
        unless ``closed``). Safe to call twice."""
        refresh, self._refresh = self._refresh, None
        if refresh is not None and not refresh.done():
            refresh.cancel()
            await asyncio.wait([refresh])
        pipes, self._pipes = list(self._pipes.values()), {}
        for one in pipes:
            one.closed = self.closed
            await one.aclose()
