"""``bench.run --scrape`` (issue 17): the fan-out and topics benchmarks run the library's
contenders also with ``/metrics`` scraped every second, in the same run.

A smoke run at tiny sizes, like tests/test_bench_smoke.py: no timed assertion.
The overhead figures come from full runs on a quiet machine (docs/operations.md).
"""

from __future__ import annotations

import shutil

import pytest

from bench.run import Config, run_benchmark

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed: `make system` installs it"
)


@pytest.mark.parametrize("benchmark", ["fanout", "topics"])
def test_scrape_runs_each_library_contender_scraped_and_not(benchmark: str) -> None:
    contenders = ["bare", "replay-memory", "replay-redis"]
    cfg = Config(quick=True, reps=1, contenders=contenders, verbose=False, scrape=True)
    result = run_benchmark(benchmark, cfg)
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {*contenders, "replay-memory+scrape", "replay-redis+scrape"}
    for name, row in rows.items():
        assert row["received"] == row["expected"] > 0, row
        if name.startswith("replay"):
            assert (row["gaps"], row["duplicates"], row["closes"]) == (0, 0, {}), row
        # scraped at least once (at the start of the measurement), and only the +scrape runs
        assert (row.get("scrapes", 0) >= 1) is name.endswith("+scrape"), row
    table = {entry["contender"]: entry for entry in result["table"]}
    for name in ("replay-memory+scrape", "replay-redis+scrape"):
        assert table[name]["unscraped_ratio"] > 0, table[name]
    assert "unscraped_ratio" not in table["replay-memory"]
