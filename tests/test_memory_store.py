"""MemoryStore-specific behaviour: bounds, expiry, LRU, cursors, idempotency, validation.

The backend-agnostic promises live in test_store_contract.py. MemoryStore's
methods never suspend, so these tests drive its coroutines synchronously; that
lets them replace the module's clock without touching the event loop's.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from starlette_replay import Cursor, Event, MemoryStore
from starlette_replay.stores import memory

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that must complete without suspending."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise AssertionError("MemoryStore suspended")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(memory, "time", types.SimpleNamespace(monotonic=fake.monotonic, time_ns=fake.time_ns))
    yield fake


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.resets: list[tuple[str, str]] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def reset(self, topic: str, reason: str) -> None:
        self.resets.append((topic, reason))


def publish(store: MemoryStore, topic: str, n: int = 1, key: str | None = None) -> list[Event]:
    return run(store.append(topic, [("e", str(i)) for i in range(n)], idempotency_key=key))


def offsets(events: list[Event]) -> list[int]:
    return [e.offset for e in events]


# --- constructor ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["history_size", "max_topics", "max_cursors"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10", None])
def test_constructor_refuses_bad_counts(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        MemoryStore(**{name: value})


@pytest.mark.parametrize("value", [0, -1, True, "5", float("nan"), -0.5])
def test_constructor_refuses_bad_ttl(value: Any) -> None:
    with pytest.raises(ValueError, match="history_ttl"):
        MemoryStore(history_ttl=value)


def test_constructor_accepts_defaults_and_floats() -> None:
    store = MemoryStore(history_ttl=0.5)
    assert (store.history_size, store.max_topics, store.max_cursors) == (10_000, 100_000, 100_000)
    assert store.history_ttl == 0.5
    assert "MemoryStore(" in repr(store)


# --- history_size -----------------------------------------------------------------------------


def test_history_size_keeps_the_newest() -> None:
    store = MemoryStore(history_size=3)
    publish(store, "t", 2)
    publish(store, "t", 3)
    pos = run(store.position("t"))
    assert (pos.head, pos.oldest) == (5, 3)
    assert offsets(run(store.read("t", 0, 100))) == [3, 4, 5]
    assert offsets(run(store.read("t", 3, 100))) == [4, 5]
    assert offsets(run(store.read("t", 3, 1))) == [4]
    assert run(store.read("t", 5, 100)) == []
    assert run(store.read("t", 99, 100)) == []
    assert run(store.read("t", 0, 0)) == []


def test_one_append_larger_than_history_keeps_consecutive_offsets() -> None:
    store = MemoryStore(history_size=2)
    events = publish(store, "t", 5)
    assert offsets(events) == [1, 2, 3, 4, 5]
    assert len({e.epoch for e in events}) == 1
    assert offsets(run(store.read("t", 0, 10))) == [4, 5]


def test_empty_topic_position() -> None:
    store = MemoryStore()
    pos = run(store.position("fresh"))
    assert (pos.head, pos.oldest) == (0, 1)
    assert run(store.position("fresh")).epoch == pos.epoch
    assert run(store.read("unknown", 0, 10)) == []


def test_time_is_wall_clock_ms(clock: Clock) -> None:
    store = MemoryStore()
    (event,) = publish(store, "t")
    assert event.time == 1_000_000


# --- history_ttl ---------------------------------------------------------------------------------


def test_ttl_forgets_an_idle_topic(clock: Clock) -> None:
    store = MemoryStore(history_ttl=10)
    (first,) = publish(store, "t")
    clock.now += 9.9
    assert run(store.position("t")).epoch == first.epoch
    assert offsets(run(store.read("t", 0, 10))) == [1]
    clock.now += 0.1
    assert run(store.read("t", 0, 10)) == []
    pos = run(store.position("t"))
    assert pos.epoch != first.epoch and (pos.head, pos.oldest) == (0, 1)
    (again,) = publish(store, "t")
    assert again.offset == 1 and again.epoch == pos.epoch


def test_ttl_counts_from_the_last_publish_not_reads(clock: Clock) -> None:
    store = MemoryStore(history_ttl=10)
    (first,) = publish(store, "t")
    clock.now += 6
    run(store.read("t", 0, 10))
    publish(store, "t")
    clock.now += 6
    assert run(store.position("t")).epoch == first.epoch
    clock.now += 6
    run(store.read("t", 0, 10))
    assert run(store.position("t")).epoch != first.epoch


def test_ttl_sweeps_other_idle_topics_on_create(clock: Clock) -> None:
    store = MemoryStore(history_ttl=10)
    publish(store, "old")
    clock.now += 11
    publish(store, "new")
    assert "old" not in store._topics


def test_ttl_spares_a_topic_with_live_subscribers(clock: Clock) -> None:
    store = MemoryStore(history_ttl=10)
    sink = Sink()

    async def body() -> None:
        async with store.connect(sink):
            (first,) = await store.append("t", [("e", "1")])
            await store.subscribe("t")
            clock.now += 100
            await store.append("other", [("e", "1")])
            assert (await store.position("t")).epoch == first.epoch
            assert offsets(await store.read("t", 0, 10)) == [1]
            await store.unsubscribe("t")
            assert (await store.position("t")).epoch != first.epoch

    run(body())


# --- max_topics -----------------------------------------------------------------------------------


def test_max_topics_forgets_the_least_recently_published() -> None:
    store = MemoryStore(max_topics=2)
    (a,) = publish(store, "a")
    (b,) = publish(store, "b")
    publish(store, "a")  # a is now the most recently published
    publish(store, "c")
    assert run(store.position("a")).epoch == a.epoch
    assert run(store.read("b", 0, 10)) == []
    # b comes back in a new epoch, offsets from 1
    (b2,) = publish(store, "b")
    assert b2.epoch != b.epoch and b2.offset == 1


def test_max_topics_forgets_never_published_topics_before_published_ones() -> None:
    """Subscribing to topics nobody publishes to must not push out topics with history."""
    store = MemoryStore(max_topics=3)
    (a,) = publish(store, "a")
    publish(store, "b")
    for i in range(10):
        run(store.position(f"empty:{i}"))  # what a subscribe to an unknown topic does
    publish(store, "c")
    assert run(store.position("a")).epoch == a.epoch
    assert offsets(run(store.read("a", 0, 10))) == [1]
    assert offsets(run(store.read("b", 0, 10))) == [1]
    assert len(store._topics) <= 3


def test_ttl_sweep_still_works_with_never_published_topics(clock: Clock) -> None:
    store = MemoryStore(history_ttl=10)
    publish(store, "old")
    clock.now += 5
    run(store.position("empty"))
    clock.now += 6
    publish(store, "new")
    assert "old" not in store._topics


def test_max_topics_spares_topics_with_live_subscribers() -> None:
    store = MemoryStore(max_topics=2)
    sink = Sink()

    async def body() -> None:
        async with store.connect(sink):
            (a,) = await store.append("a", [("e", "1")])
            await store.subscribe("a")
            await store.append("b", [("e", "1")])
            await store.append("c", [("e", "1")])
            await store.append("d", [("e", "1")])
            assert (await store.position("a")).epoch == a.epoch
            assert offsets(await store.read("a", 0, 10)) == [1]

    run(body())


def test_max_topics_never_drops_the_event_just_published() -> None:
    """When every older topic is live, the newest publish must still be stored."""
    store = MemoryStore(max_topics=1)
    sink = Sink()

    async def body() -> None:
        async with store.connect(sink):
            await store.subscribe("a")
            await store.append("a", [("e", "1")])
            (b,) = await store.append("b", [("e", "1")])
            assert offsets(await store.read("b", 0, 10)) == [1]
            (b2,) = await store.append("b", [("e", "2")])
            assert (b2.epoch, b2.offset) == (b.epoch, 2)
            assert (await store.position("b")).epoch == b.epoch

    run(body())


# --- live side -------------------------------------------------------------------------------------


def test_delivers_only_subscribed_topics_in_order() -> None:
    store = MemoryStore()
    sink = Sink()

    async def body() -> None:
        async with store.connect(sink):
            await store.append("t", [("e", "0")])
            await store.subscribe("t")
            await store.append("t", [("e", "1"), ("e", "2")])
            await store.append("u", [("e", "1")])
            await store.unsubscribe("t")
            await store.append("t", [("e", "3")])
        assert [(e.topic, e.offset) for e in sink.events] == [("t", 2), ("t", 3)]

    run(body())


def test_connect_twice_refused_and_reusable_after() -> None:
    store = MemoryStore()

    async def body() -> None:
        async with store.connect(Sink()):
            await store.subscribe("t")
            with pytest.raises(RuntimeError):
                async with store.connect(Sink()):
                    pass
        sink = Sink()
        async with store.connect(sink):
            # live topics do not survive a reconnect
            await store.append("t", [("e", "1")])
        assert sink.events == []

    run(body())


# --- cursors ------------------------------------------------------------------------------------------


def test_cursor_moves_forward_within_an_epoch() -> None:
    store = MemoryStore()
    run(store.save_cursor("alice", "t", Cursor("e1", 5)))
    run(store.save_cursor("alice", "t", Cursor("e1", 3)))
    assert run(store.load_cursor("alice", "t")) == Cursor("e1", 5)
    run(store.save_cursor("alice", "t", Cursor("e1", 7)))
    assert run(store.load_cursor("alice", "t")) == Cursor("e1", 7)
    run(store.save_cursor("alice", "t", Cursor("e2", 1)))
    assert run(store.load_cursor("alice", "t")) == Cursor("e2", 1)
    assert run(store.load_cursor("bob", "t")) is None
    assert run(store.load_cursor("alice", "u")) is None


def test_max_cursors_forgets_least_recently_written() -> None:
    store = MemoryStore(max_cursors=2)
    run(store.save_cursor("a", "t", Cursor("e", 1)))
    run(store.save_cursor("b", "t", Cursor("e", 1)))
    run(store.save_cursor("a", "t", Cursor("e", 2)))  # a written again: b is now the oldest
    run(store.save_cursor("c", "t", Cursor("e", 1)))
    assert run(store.load_cursor("a", "t")) == Cursor("e", 2)
    assert run(store.load_cursor("b", "t")) is None
    assert run(store.load_cursor("c", "t")) == Cursor("e", 1)


# --- idempotency ----------------------------------------------------------------------------------------


def test_idempotency_key_stores_once() -> None:
    store = MemoryStore()
    first = run(store.append("t", [("e", "1"), ("e", "2")], idempotency_key="k"))
    again = run(store.append("t", [("e", "9")], idempotency_key="k"))
    assert again == first
    assert run(store.position("t")).head == 2
    # keys are per topic
    (other,) = run(store.append("u", [("e", "1")], idempotency_key="k"))
    assert other.topic == "u"
    (third,) = publish(store, "t", key="k2")
    assert third.offset == 3


def test_idempotency_keys_are_bounded_by_retained_history() -> None:
    store = MemoryStore(history_size=2)
    (first,) = publish(store, "t", key="k")
    assert publish(store, "t", key="k") == [first]
    for i in range(50):
        publish(store, "t", key=f"key-{i}")
    # only keys whose events are still retained are remembered
    assert len(store._topics["t"].keys) <= 2
    (again,) = publish(store, "t", key="k")
    assert again.offset == 52


def test_idempotency_key_does_not_survive_a_new_epoch() -> None:
    store = MemoryStore(max_topics=1)
    (first,) = publish(store, "t", key="k")
    publish(store, "u")
    (again,) = publish(store, "t", key="k")
    assert again.epoch != first.epoch and again.offset == 1


def test_epochs_are_random() -> None:
    epochs = {run(MemoryStore().position("t")).epoch for _ in range(50)}
    assert len(epochs) == 50


def test_retained_history_is_not_traced_by_the_garbage_collector() -> None:
    # A full collection traces every tracked object: 10,000 events kept per topic
    # for 1,000 topics must not make each one slower. What the store retains is
    # untracked once the collector has seen it (tuples of str and int).
    import gc

    store = MemoryStore(history_size=5_000)
    run(store.append("warm", [("e", "0")]))
    gc.collect()
    before = len(gc.get_objects())
    for topic in ("a", "b", "c", "d"):
        for i in range(5_000):
            run(store.append(topic, [("e", f'{{"i":{i}}}')], idempotency_key=f"k{i}" if i % 2 else None))
    gc.collect()
    assert len(gc.get_objects()) - before < 1_000  # not one (or more) per retained event
    # and what is read back is whole: the same events, their idempotency keys honoured
    (again,) = run(store.append("a", [("e", "x")], idempotency_key="k4999"))
    assert (again.offset, again.raw) == (5_000, '{"i":4999}')
    assert [e.offset for e in run(store.read("a", 4_990, 100))] == list(range(4_991, 5_001))
