"""Tables (markdown) and the fan-out plot from ``bench/results/*.json``.

Run with the plot venv (matplotlib is not a dependency of the library)::

    bench/.venvs/plot/bin/python -m bench.report            # prints the tables, writes docs/benchmarks-fanout.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.run import CEILINGS, RESULTS, ROOT, TABLES

ORDER = [
    "bare",
    "replay-memory",
    "replay-redis",
    "broadcaster-redis",
    "broadcaster-stream",
    "socketio-redis",
    "raw-redis-loop",
    "raw-redis-script",
    "raw-xadd-publish",
    "raw-redis-pool",
    "raw-redis-pipeline",
]


def _rank(entry: dict[str, Any]) -> int:
    name = entry["contender"]
    return ORDER.index(name) if name in ORDER else len(ORDER)


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def markdown(benchmark: str, result: dict[str, Any]) -> str:
    keys, figure, _, baseline = TABLES[benchmark]
    label = {
        "rate": "events/s",
        "p99": "p99 ms",
        "bytes_per_connection": "bytes/connection",
    }[figure]
    head = [*keys, "contender", f"median {label}", f"ratio to {baseline}"]
    measured = [e for e in result["table"] if e["median"] is not None]
    if benchmark == "latency":
        head += ["p50 ms", "max ms"]
    ceiling = CEILINGS.get(benchmark)
    if ceiling:
        head.append(f"ratio to {ceiling}")
    cpu = benchmark in ("fanout", "topics") and all("cpu_us" in e for e in measured)
    if cpu:
        head.append("server CPU µs/event")
    connections = any("redis_connections" in e for e in result["table"])
    if connections:
        head += ["Redis connections seen", "opened"]
    if benchmark in ("fanout", "latency", "catchup", "topics"):
        head += ["gaps", "dups", "server closes"]
    head.append("runs")
    failures = any(e.get("failed") for e in result["table"])
    if failures:
        head.append("failed runs")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = sorted(result["table"], key=lambda e: (tuple(e[k] for k in keys), _rank(e)))
    for entry in table:
        cells = [str(entry[k]).removesuffix(".0") for k in keys]
        if entry["median"] is None:  # every run failed
            cells += [entry["contender"], "failed: " + entry["error"].replace("|", "/")]
            cells += [""] * (len(head) - len(cells) - 2) + [str(entry["runs"]), str(entry["failed"])]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells += [entry["contender"], _fmt(entry["median"])]
        cells.append("-" if entry["ratio"] is None else f"{entry['ratio']:.2f}x")
        if benchmark == "latency":
            cells += [f"{entry['p50']:.2f}", f"{entry['max']:.2f}"]
        if ceiling:
            cells.append("-" if entry.get("ceiling_ratio") is None else f"{entry['ceiling_ratio']:.2f}x")
        if cpu:
            cells.append(f"{entry['cpu_us']:,.0f}")
        if connections:
            cells += [f"{entry['redis_connections']:,}", f"{entry['redis_connections_opened']:,}"]
        if benchmark in ("fanout", "latency", "catchup", "topics"):
            cells += [str(entry["gaps"]), str(entry["duplicates"]), str(entry.get("closes", 0))]
        cells.append(str(entry["runs"]))
        if failures:
            cells.append(str(entry.get("failed", 0)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in result["table"]:
        series.setdefault(entry["contender"], []).append((int(entry["clients"]), float(entry["median"])))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in sorted(series, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        points = sorted(series[name])
        style = "-" if name.startswith(("replay", "bare")) else "--"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients on one topic")
    ax.set_ylabel("delivered events/s (median of runs)")
    ax.set_title("Fan-out throughput, 1 publisher, ~256-byte events (2 cores, loopback)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "benchmarks-fanout.png")
    args = parser.parse_args(argv)
    for benchmark in TABLES:
        path = args.results / f"{benchmark}.json"
        if not path.exists():
            print(f"(no {path})", file=sys.stderr)
            continue
        result = json.loads(path.read_text())
        load = ", ".join(f"{x:.2f}" for x in result["machine"]["load"])
        print(f"### {benchmark}\n\n{result['reps']} runs, {result['at']}, load average at the end: {load}\n")
        print(markdown(benchmark, result) + "\n")
        if benchmark == "fanout":
            plot(result, args.png)
            print(f"(plot written to {args.png})\n", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
