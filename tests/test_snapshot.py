"""Replay.snapshot: the newest retained events, contiguous up to the head, and the cursor after them."""

from __future__ import annotations

import pytest

from starlette_replay import Cursor, Event, MemoryStore, NotRunning, Replay, ReplayError, allow_all

pytestmark = pytest.mark.anyio


class TrimmingStore(MemoryStore):
    """Loses the oldest event of each read for the first ``failures`` reads (a trim racing the reader)."""

    def __init__(self, failures: int, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.reads = 0

    async def read(self, topic: str, after: int, limit: int) -> list[Event]:
        self.reads += 1
        page = await super().read(topic, after, limit)
        if self.failures > 0:
            self.failures -= 1
            return page[1:]
        return page


async def test_snapshot_of_a_new_and_of_a_published_topic() -> None:
    async with Replay(MemoryStore(), authorize=allow_all) as replay:
        empty = await replay.snapshot("t")
        assert (empty.head, empty.events, empty.complete) == (0, [], True)
        published = await replay.publish_many("t", [("n", n) for n in range(1, 1201)])
        snap = await replay.snapshot("t", limit=2000)
        assert snap.events == published  # more than one page of reads
        assert (snap.epoch, snap.head, snap.complete) == (empty.epoch, 1200, True)
        assert snap.cursor == Cursor(empty.epoch, 1200)


async def test_snapshot_limit_keeps_the_newest_events() -> None:
    async with Replay(MemoryStore(history_size=50), authorize=allow_all) as replay:
        await replay.publish_many("t", [("n", n) for n in range(100)])
        snap = await replay.snapshot("t", limit=10)
        assert [e.offset for e in snap.events] == list(range(91, 101))
        assert (snap.head, snap.complete) == (100, False)
        whole = await replay.snapshot("t", limit=50)
        assert [e.offset for e in whole.events] == list(range(51, 101))
        assert whole.complete


async def test_snapshot_reads_again_when_history_is_trimmed_meanwhile() -> None:
    store = TrimmingStore(failures=2)
    async with Replay(store, authorize=allow_all) as replay:
        await replay.publish_many("t", [("n", n) for n in range(5)])
        snap = await replay.snapshot("t")
        assert [e.offset for e in snap.events] == [1, 2, 3, 4, 5]
        assert store.reads == 3


async def test_snapshot_gives_up_on_a_history_that_never_holds_still() -> None:
    store = TrimmingStore(failures=1_000)
    async with Replay(store, authorize=allow_all) as replay:
        await replay.publish_many("t", [("n", n) for n in range(5)])
        with pytest.raises(ReplayError, match="changed under every attempt"):
            await replay.snapshot("t")
        assert store.reads == 5


async def test_snapshot_validates_and_needs_a_running_replay() -> None:
    replay = Replay(MemoryStore(), authorize=allow_all)
    with pytest.raises(NotRunning):
        await replay.snapshot("t")
    async with replay:
        with pytest.raises(ValueError, match="limit"):
            await replay.snapshot("t", limit=0)
        with pytest.raises(ValueError, match="topic"):
            await replay.snapshot("bad topic")
