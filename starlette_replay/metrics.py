"""What a Replay counts, and the Prometheus collector that reads it at scrape time.

The parts that do the work bump plain ``int`` attributes of one
:class:`Metrics` object as things happen: no lock (everything runs on the
event loop's thread), no label lookup and no object made on the paths that run
per event or per frame (beyond the integers themselves, which CPython makes
anew past 256). Figures that already exist (open connections, queued
frames, subscriptions, a Redis store's reconnects) are not counted twice: the
collector reads them from their owners when Prometheus scrapes.

:class:`ReplayCollector` (the ``metrics`` extra installs prometheus-client) turns
all of it into ``starlette_replay_*`` metric families; ``Replay.metrics_route``
serves them in the Prometheus text format. The figures are per process: see
``docs/operations.md`` for aggregating the workers of one app.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["LAG_BUCKETS", "PUBLISH_BUCKETS", "Histogram", "Metrics", "RedisFigures", "ReplayCollector"]

#: Upper bounds (seconds) of the publish latency histogram's buckets (+Inf follows).
PUBLISH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Upper bounds (seconds) of the publish-to-deliver lag histogram's buckets (+Inf follows).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# One live event in this many has its publish-to-deliver lag measured (a power of two: a mask).
LAG_SAMPLE_EVERY = 16

_MISSING_CLIENT = "Replay.metrics_route() needs prometheus-client: pip install 'starlette-replay[metrics]'"


class _Cursor(Protocol):
    """A resume's cursor (``stores.base.Cursor``): this module imports nothing of the package."""

    @property
    def epoch(self) -> str: ...

    @property
    def offset(self) -> int: ...


class _Position(Protocol):
    """A topic's position (``stores.base.Position``)."""

    @property
    def epoch(self) -> str: ...

    @property
    def head(self) -> int: ...


class Histogram:
    """Bucket counts (not cumulative; the last one is +Inf) and a sum, for one value per observation.

    ``observe`` costs one ``bisect`` on a tuple and two additions: no lock, no lookup.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le, "less or equal").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of observations <= le)`` pairs, the last ``+Inf``: what Prometheus wants."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    """The counters of one Replay, bumped by its parts (plain attributes: read them in tests).

    Every counter only grows. Made by the Replay and given to the hub, the
    publisher, the registry and each connection.
    """

    __slots__ = (
        "closes",
        "connections_opened",
        "events_replayed",
        "events_stored",
        "frames_sent_closed",
        "lag",
        "live_events",
        "publish_seconds",
        "publishes_error",
        "publishes_invalid",
        "publishes_ok",
        "publishes_unavailable",
        "replays",
        "resumes_ahead",
        "resumes_epoch",
        "resumes_recovered",
        "resumes_reused_offset",
        "resumes_trimmed",
        "slow_consumer_closes",
        "sse_streams_opened",
    )

    def __init__(self) -> None:
        # Connections (registry.py): opened when tracked after accept(); closed, by the
        # close code the server sent ("peer" when the client left or vanished first).
        self.connections_opened = 0
        self.closes: dict[str, int] = {}
        # Frames written by connections that have ended; the open ones' are added at scrape time.
        self.frames_sent_closed = 0
        self.slow_consumer_closes = 0
        # Publishing (publisher.py): by outcome, events in the successful ones, latency.
        self.publishes_ok = 0
        self.publishes_invalid = 0  # InvalidTopic, InvalidEvent: refused before anything was stored
        self.publishes_unavailable = 0  # StoreUnavailable, NotRunning: the store could not confirm it
        self.publishes_error = 0  # another StoreError: the store refused it
        self.events_stored = 0
        self.publish_seconds = Histogram(PUBLISH_BUCKETS)
        # Fan-out (hub.py): live events received for local subscribers; one in
        # LAG_SAMPLE_EVERY has its publish-to-deliver lag observed.
        self.live_events = 0
        self.lag = Histogram(LAG_BUCKETS)
        # Subscribes (connection.py): replays started and events replayed; resumes by outcome.
        self.replays = 0
        self.events_replayed = 0
        self.resumes_recovered = 0
        self.resumes_epoch = 0
        self.resumes_trimmed = 0
        self.resumes_ahead = 0
        self.resumes_reused_offset = 0
        # SSE streams (registry.py): counted among the connections above too.
        self.sse_streams_opened = 0

    def published(self, events: int, seconds: float) -> None:
        """A publish stored ``events`` events in ``seconds``."""
        self.publishes_ok += 1
        self.events_stored += events
        self.publish_seconds.observe(seconds)

    def live_event(self, time_ms: int) -> None:
        """The hub received a live event stamped ``time_ms`` (the store's clock) for local subscribers."""
        self.live_events += 1
        if not self.live_events & (LAG_SAMPLE_EVERY - 1):
            # The store's clock against this process's: across machines their skew is in it;
            # a negative lag (a clock behind) counts as 0.
            self.lag.observe(max(0.0, time.time() - time_ms / 1000))

    def closed(self, code: int | None, frames_sent: int) -> None:
        """A connection ended, closed by the server with ``code`` (None: the client left first)."""
        label = "peer" if code is None else str(code)
        self.closes[label] = self.closes.get(label, 0) + 1
        self.frames_sent_closed += frames_sent

    def subscribed(
        self, cursor: _Cursor | None, position: _Position, start: int, recovered: bool, reason: str | None = None
    ) -> None:
        """A subscribe answered: it replays from ``start`` up to the head of ``position``, and
        resumed from ``cursor`` (sent or stored; None: not a resume).

        Counts a replay when there is one, and the resume by its outcome (see :meth:`resumed`).
        """
        if start < position.head:
            self.replays += 1
        self.resumed(cursor, position, recovered, reason)

    def resumed(self, cursor: _Cursor | None, position: _Position, recovered: bool, reason: str | None = None) -> None:
        """A subscribe resumed from ``cursor`` (sent or stored; None: not a resume, not counted)
        against the topic's ``position``.

        Not recovered, the reason is ``reason`` when given (``"reused_offset"``: the
        event at the cursor's offset has another ``time``), else what the cursor and
        the position tell: another ``"epoch"``, a cursor ``"ahead"`` of the head, or
        ``"trimmed"`` (older than the retained history, or trimmed while it was read).
        """
        if cursor is None:
            return
        if recovered:
            self.resumes_recovered += 1
        elif reason == "reused_offset":
            self.resumes_reused_offset += 1
        elif cursor.epoch != position.epoch:
            self.resumes_epoch += 1
        elif cursor.offset > position.head:
            self.resumes_ahead += 1
        else:
            self.resumes_trimmed += 1

    def resumes(self) -> dict[str, int]:
        """Resumes by outcome (the label values of ``starlette_replay_resumes_total``)."""
        return {
            "recovered": self.resumes_recovered,
            "epoch": self.resumes_epoch,
            "trimmed": self.resumes_trimmed,
            "ahead": self.resumes_ahead,
            "reused_offset": self.resumes_reused_offset,
        }


@runtime_checkable
class RedisFigures(Protocol):
    """What a store on Redis tells about its connections (``RedisStore`` has them)."""

    @property
    def reconnects(self) -> int: ...

    @property
    def resets(self) -> int: ...

    @property
    def commands_in_flight(self) -> int: ...


class ReplayCollector:
    """A prometheus-client collector of one Replay's figures, read when it is scraped.

    Made by ``Replay.collector()`` (``Replay.metrics_route`` serves one from a
    registry of its own). To serve them with the app's other metrics instead,
    register one in that registry:
    ``prometheus_client.REGISTRY.register(replay.collector())`` (one per Replay:
    two would report the same names). Raises ``ImportError`` without
    prometheus-client.

    Safe to scrape from any thread (prometheus-client's own HTTP server runs
    in one): the figures are read where ``on_loop`` runs a function, on the
    Replay's event loop thread while it runs, since the connections, topics
    and queues they are read from change there.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        stats: Callable[[], dict[str, int]],
        frames_sent_open: Callable[[], int],
        ready: Callable[[], bool],
        store: object,
        on_loop: Callable[[Callable[[], list[Metric]]], list[Metric]] = lambda read: read(),
    ) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(_MISSING_CLIENT) from exc
        self._metrics = metrics
        self._stats = stats
        self._frames_sent_open = frames_sent_open
        self._ready = ready
        self._store = store
        self._on_loop = on_loop

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now (prometheus-client calls it on every scrape)."""
        yield from self._on_loop(self._families)

    def _families(self) -> list[Metric]:
        return list(self._read())

    def _read(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self._metrics
        figures = self._stats()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"starlette_replay_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"starlette_replay_{name}", doc, value=value)

        def labelled(
            family: Callable[..., CounterMetricFamily | GaugeMetricFamily],
            name: str,
            doc: str,
            label: str,
            values: dict[str, int],
        ) -> CounterMetricFamily | GaugeMetricFamily:
            metric = family(f"starlette_replay_{name}", doc, labels=[label])
            for key, value in sorted(values.items()):
                metric.add_metric([key], value)
            return metric

        def histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
            return HistogramMetricFamily(f"starlette_replay_{name}", doc, buckets=hist.cumulative(), sum_value=hist.sum)

        yield gauge("ready", "1 while the Replay runs and its store answers (Replay.health()), else 0", self._ready())
        yield gauge(
            "connections_open", "connections open now (WebSocket connections and SSE streams)", figures["connections"]
        )
        yield counter(
            "connections_opened", "connections accepted (WebSocket connections and SSE streams)", m.connections_opened
        )
        yield labelled(
            CounterMetricFamily,
            "connections_closed",
            "connections ended, by the close code the server sent (an SSE stream: the code it would have "
            "sent; peer: the client left first)",
            "code",
            m.closes,
        )
        yield counter(
            "slow_consumer_closes",
            "connections closed with 1013 because their live queue passed send_queue_size",
            m.slow_consumer_closes,
        )
        yield gauge("subscriptions", "subscriptions held by open connections", figures["subscriptions"])
        yield gauge("topics", "topics with subscribers in this process", figures["topics"])
        yield gauge(
            "frames_queued",
            "frames waiting to be written, and live events held back during replays",
            figures["queued_frames"],
        )
        yield counter(
            "frames_sent",
            "frames written to clients (events live and replayed, replies, pings)",
            m.frames_sent_closed + self._frames_sent_open(),
        )
        yield labelled(
            CounterMetricFamily,
            "publishes",
            "publish calls by outcome (ok; invalid: refused before storing; unavailable: the store could "
            "not confirm; error: the store refused)",
            "outcome",
            {
                "ok": m.publishes_ok,
                "invalid": m.publishes_invalid,
                "unavailable": m.publishes_unavailable,
                "error": m.publishes_error,
            },
        )
        yield counter("events_stored", "events in successful publishes", m.events_stored)
        yield histogram("publish_seconds", "time a successful publish took, validated to stored", m.publish_seconds)
        yield counter("live_events", "live events the store delivered to this process's subscribers", m.live_events)
        yield histogram(
            "deliver_lag_seconds",
            f"store time of a live event to its fan-out here, one event in {LAG_SAMPLE_EVERY} (clock skew included)",
            m.lag,
        )
        yield counter("replays", "subscribes that replayed stored events", m.replays)
        yield counter("events_replayed", "stored events queued by replays", m.events_replayed)
        yield labelled(
            CounterMetricFamily,
            "resumes",
            "subscribes from a cursor, by outcome (recovered, or why not: epoch, trimmed, ahead, reused_offset)",
            "outcome",
            m.resumes(),
        )
        yield gauge(
            "sse_streams_open", "SSE streams open now (counted in connections_open too)", figures["sse_streams"]
        )
        yield counter(
            "sse_streams_opened", "SSE streams accepted (counted in connections_opened too)", m.sse_streams_opened
        )
        store = self._store
        if isinstance(store, RedisFigures):
            yield counter("redis_reconnects", "times the Redis listener (re)connected", store.reconnects)
            yield counter(
                "redis_resets",
                "topics the Redis listener reset (their subscribers closed with 1013)",
                store.resets,
            )
            yield gauge(
                "redis_commands_in_flight",
                "commands sent to Redis (or queued to be) and not answered yet",
                store.commands_in_flight,
            )
