"""The live side of RedisStore on a Redis Cluster: one :class:`~._listener.Listener` per primary.

The append script SPUBLISHes on the topic's channel, which shares the topic's
slot, so the event reaches only that slot's shard. Each primary gets one
listener (one pub/sub connection, speaking SSUBSCRIBE), never one per topic.
Each topic lives in exactly one listener, the one of the primary its slot
belongs to, and is moved when that changes:

* the server unsubscribes a topic by itself (``sunsubscribe`` with nobody
  asking) when its slot leaves the node (a migration, a fail-over that made
  the node a replica): the topic is *homeless* until the slot map is
  refreshed, then adopted by the listener of its new primary;
* a listener's connection fails (a primary killed): the slot map is
  refreshed, again after every failed reconnect, until the cluster promoted a
  replica; then that node's topics move to the new primary's listener.

Every primary has a listener, watched topics or not, so the store's health
probe (``_health``: a classic PUBLISH, which a cluster copies to every node,
received on each listener's connection by a classic SUBSCRIBE) tests the live
path of every shard: the store counts as receiving probes while every
primary's listener does, as of the oldest of their last probes.

A moved topic keeps where it stood (epoch, last offset delivered and its
time): once its new node confirms the subscription, the listener repairs it
from the stream exactly as after a reconnect (``Listener._confirmed``), so
events published while it moved are delivered once, in order, and a head
that moved back or a reused offset resets it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ...errors import StoreUnavailable
from ..base import LiveSink
from ._cluster import Address, Routes, key_slot
from ._listener import Listener, ProbeSink, ReadState, _Topic

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["ShardedListener"]


class _NodeProbe:
    """The probe as one node's listener sees it: it reports to the ShardedListener."""

    __slots__ = ("address", "channel", "raw_channel", "shards")

    def __init__(self, shards: ShardedListener, probe: ProbeSink, address: Address) -> None:
        self.shards = shards
        self.address = address
        self.channel = probe.channel
        self.raw_channel = probe.raw_channel

    def received(self, at: float | None = None) -> None:
        self.shards._probe_received(self.address, time.monotonic() if at is None else at)

    def listener_lost(self) -> None:
        self.shards._probe_received(self.address, None)


logger = logging.getLogger("starlette_replay.stores.redis.listener")


class ShardedListener:
    """Live events of the subscribed topics on a Redis Cluster (see the module docstring).

    Offers what the store uses of a :class:`Listener`: ``subscribe``,
    ``unsubscribe``, ``run``, ``clear``, ``sink``, ``topics``, ``reconnects``
    and ``resets``.
    """

    def __init__(
        self,
        routes: Routes,
        *,
        new_connection: Callable[[Address], AbstractConnection],
        read_state: ReadState,
        channel: Callable[[str], str],
        publish_timeout: float,
        health_check_interval: float,
    ) -> None:
        self._routes = routes
        self._new_connection = new_connection
        self._read_state = read_state
        self._channel = channel
        self.publish_timeout = publish_timeout
        self.health_check_interval = health_check_interval
        self._sink: LiveSink | None = None
        self._nodes: dict[Address, Listener] = {}
        self._scopes: dict[Address, anyio.CancelScope] = {}
        self._homeless: dict[str, _Topic] = {}  # dropped by their node, waiting for the new map
        self._tasks: anyio.abc.TaskGroup | None = None
        self._retired_reconnects = 0
        self._retired_resets = 0
        self._probe: ProbeSink | None = None
        self._probe_at: dict[Address, float | None] = {}  # each node listener's last probe received
        routes.on_change.append(self._rehome)

    @property
    def probe(self) -> ProbeSink | None:
        """The store's health probe (``_health.Probe``), told about every node's listener."""
        return self._probe

    @probe.setter
    def probe(self, probe: ProbeSink | None) -> None:
        self._probe = probe
        for address, listener in self._nodes.items():
            listener.probe = None if probe is None else _NodeProbe(self, probe, address)

    def _probe_received(self, address: Address, at: float | None) -> None:
        if address not in self._nodes:
            return  # a retired listener's last word
        self._probe_at[address] = at
        self._report_probe()

    def _report_probe(self) -> None:
        probe = self._probe
        if probe is None:
            return
        times = list(self._probe_at.values())
        if not times or None in times:
            probe.listener_lost()
        else:
            probe.received(min(t for t in times if t is not None))

    # --- what the store reads ----------------------------------------------------------

    @property
    def sink(self) -> LiveSink | None:
        return self._sink

    @sink.setter
    def sink(self, sink: LiveSink | None) -> None:
        self._sink = sink
        for listener in self._nodes.values():
            listener.sink = sink

    @property
    def topics(self) -> dict[str, _Topic]:
        """Every watched topic (a new dict)."""
        topics = dict(self._homeless)
        for listener in self._nodes.values():
            topics.update(listener.topics)
        return topics

    @property
    def reconnects(self) -> int:
        """Connections made by the node listeners, together."""
        return self._retired_reconnects + sum(listener.reconnects for listener in self._nodes.values())

    @property
    def resets(self) -> int:
        return self._retired_resets + sum(listener.resets for listener in self._nodes.values())

    @property
    def nodes(self) -> list[Address]:
        """The primaries with a listener (one pub/sub connection each, when connected)."""
        return list(self._nodes)

    # --- subscriptions ------------------------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        """Watch ``topic`` on the listener of its slot's primary; returns once confirmed.

        Raises ``StoreUnavailable`` after ``publish_timeout``; cancelling is safe.
        """
        try:
            with anyio.fail_after(self.publish_timeout):
                await self._routes.ready()
        except Exception as exc:
            raise StoreUnavailable(f"cannot load the Redis Cluster slot map: {exc!r}") from exc
        try:
            address = self._routes.address_of(self._key(topic))
        except ConnectionError as exc:  # NotSent: the slot has no primary right now
            raise StoreUnavailable(str(exc)) from exc
        listener = self._listener(address)
        try:
            await listener.subscribe(topic)
        except BaseException:
            # it may have moved to another node meanwhile: do not leave it there behind the caller's back
            state = self._find(topic)
            if state is not None and not state.ready.is_set():
                self.unsubscribe(topic)
            raise

    def unsubscribe(self, topic: str) -> None:
        """Stop watching ``topic``. Never fails."""
        self._homeless.pop(topic, None)
        for listener in self._nodes.values():
            if topic in listener.topics:
                listener.unsubscribe(topic)

    def clear(self) -> None:
        self._homeless.clear()
        for listener in self._nodes.values():
            listener.clear()

    def _find(self, topic: str) -> _Topic | None:
        state: _Topic | None = self._homeless.get(topic)
        for listener in self._nodes.values():
            state = listener.topics.get(topic, state)
        return state

    def _key(self, topic: str) -> str:
        return self._channel(topic)  # the channel shares the slot of the topic's keys

    # --- the node listeners --------------------------------------------------------------

    def _listener(self, address: Address) -> Listener:
        listener = self._nodes.get(address)
        if listener is None:
            listener = self._nodes[address] = Listener(
                # RESP2: plain arrays for pub/sub (redis-py 8's RESP3 push path is another beast)
                new_connection=lambda: self._new_connection(address),
                read_state=self._read_state,
                channel=self._channel,
                publish_timeout=self.publish_timeout,
                health_check_interval=self.health_check_interval,
                slot=key_slot,
                on_lost=self._routes.refresh_soon,
                on_dropped=self._dropped,
            )
            listener.sink = self._sink
            if self._probe is not None:
                listener.probe = _NodeProbe(self, self._probe, address)
            self._probe_at[address] = None
            self._report_probe()
            if self._tasks is not None:
                self._tasks.start_soon(self._run_node, address, listener)
        return listener

    async def run(self) -> None:
        """Run a listener per primary until cancelled; follow the topology meanwhile."""
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            try:
                for address, listener in list(self._nodes.items()):
                    tg.start_soon(self._run_node, address, listener)
                await self._load_map()
                for address in self._routes.primaries():
                    self._listener(address)
                await anyio.sleep_forever()
            finally:
                self._tasks = None

    async def _load_map(self) -> None:
        """The slot map, once: retried (50 ms doubling to 2 s, jittered) while no node answers."""
        failures = 0
        while True:
            try:
                with anyio.fail_after(self.publish_timeout):
                    await self._routes.ready()
                return
            except Exception as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                logger.log(level, "cannot load the Redis Cluster slot map (%r); retrying", exc)
                await anyio.sleep(min(2.0, 0.05 * 2 ** min(failures - 1, 6)) * random.uniform(0.5, 1.0))

    async def _run_node(self, address: Address, listener: Listener) -> None:
        with anyio.CancelScope() as scope:
            self._scopes[address] = scope
            try:
                await listener.run()
            finally:
                if self._scopes.get(address) is scope:
                    del self._scopes[address]

    def _dropped(self, topic: str, state: _Topic) -> None:
        """A node unsubscribed ``topic`` by itself: its slot moved. Place it once the map is new."""
        logger.info("Redis Cluster moved the slot of %r; following it", topic)
        self._homeless[topic] = state
        self._routes.refresh_soon()

    def _rehome(self) -> None:
        """After a refresh of the slot map: move every topic to the listener of its primary,
        and stop the listeners of nodes that hold none (and are no primary now)."""
        moves: list[tuple[str, _Topic, Address]] = []
        for topic, state in list(self._homeless.items()):
            try:
                moves.append((topic, state, self._routes.address_of(self._key(topic))))
            except ConnectionError:
                continue  # the slot has no primary yet: wait for the next refresh
            del self._homeless[topic]
        for address, listener in list(self._nodes.items()):
            for topic in list(listener.topics):
                try:
                    target = self._routes.address_of(self._key(topic))
                except ConnectionError:
                    continue
                released = listener.release(topic) if target != address else None
                if released is not None:
                    moves.append((topic, released, target))
        for topic, state, target in moves:
            logger.info("live events of %r now come from %s:%d", topic, *target)
            self._listener(target).adopt(topic, state)
        if self._homeless:
            self._routes.refresh_soon()  # again, until every slot has a primary
        primaries = set(self._routes.primaries())
        for address in primaries:
            self._listener(address)  # every primary is listened to (and probed)
        for address, listener in list(self._nodes.items()):
            if not listener.topics and address not in primaries:
                del self._nodes[address]
                del self._probe_at[address]
                self._report_probe()
                self._retired_reconnects += listener.reconnects
                self._retired_resets += listener.resets
                scope = self._scopes.pop(address, None)
                if scope is not None:
                    scope.cancel()
