"""The Redis event store: Streams keep each topic's history, pub/sub carries it live.

Every key of a topic shares the hash tag ``{<topic>}`` (``replay:{user:42}:meta``,
``...:log``, ``...:idem``, ``...:idemz``, ``...:cursor:<identity>``), so each
script touches one cluster slot. One Lua script per append (``append.lua``)
makes the epoch if the topic has none (the epoch comes from Python's
``secrets``: Redis 7.0's Lua ``math.random`` repeats after a restart), bumps the
head, XADDs entries whose ids are the offsets (``<offset>-0``), trims to
``history_size`` exactly, refreshes ``history_ttl`` and PUBLISHes the events
(SPUBLISH on a Redis Cluster: the channel ``...:{<topic>}:live`` shares the
slot), all in one step.

The package's parts:

* ``_store``: :class:`RedisStore`, its options, keys, commands and lifecycle;
* ``_pipeline``: commands pipelined on a fixed number of connections of the
  store's own (made with the client's settings, never from its pool);
* ``_appends``: concurrent appends to one topic coalesced into one script call;
* ``_listener``: the pub/sub connection, the per-topic offsets, repairs and resets;
* ``_scripts`` and the ``.lua`` files; ``_codec``: packing and parsing;
* on a Redis Cluster, ``_cluster``: a ``Pipelines`` per primary, chosen by
  slot, following MOVED, ASK, TRYAGAIN, CLUSTERDOWN and fail-overs; and
  ``_shards``: a ``_listener`` per primary (SSUBSCRIBE), topics moved between
  them as their slots move.

``redis`` (redis-py) is imported lazily: ``from starlette_replay import RedisStore``
works without it; constructing a store without it raises ``ImportError``.
"""

from __future__ import annotations

from ._store import RedisStore

__all__ = ["RedisStore"]
