"""How long the dashboard's migration view takes over a full comparison book.

Fills a ``ComparisonBook`` with ``report_size`` (100,000 by default) comparisons spread over a
day (80 % shadow, 20 % canary, two candidates), then times the copy of the book made in the
event loop (``MigrationSource.snapshot``) and ``migration_view`` (the comparison report plus
the per-period series, encoded to JSON; run in a worker thread by the app) for the last day
and the last hour, and its two parts alone. Prints the median and worst of several runs.

    python benchmarks/bench_dashboard_migration.py [--entries 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import msgspec

from tenantware.config import MigrationSettings
from tenantware.dashboard.app import pick_period
from tenantware.dashboard.migration import MigrationSource, _series, migration_view
from tenantware.migration import Comparison, ComparisonBook


def fill(entries: int, now: float) -> ComparisonBook:
    rng = random.Random(20)
    book = ComparisonBook(entries)
    for index in range(entries):
        shadow = rng.random() < 0.8
        book.add(
            Comparison(
                kind="shadow" if shadow else "canary",
                ts=now - rng.uniform(0, 86400),
                rule="trial",
                trial=f"trial/relay{index % 2}/gpt-4.1",
                tenant="acme",
                request_id=str(index),
                latency_s=rng.random(),
                primary_latency_s=rng.random() if shadow else 0.0,
                exact=(rng.random() < 0.5) if shadow else None,
                similarity=rng.random() if shadow else None,
                same_tools=True if shadow else None,
            )
        )
    return book


def timed(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    now = time.time()
    book = fill(args.entries, now)
    settings = msgspec.convert(
        {
            "rules": [
                {
                    "name": "trial",
                    "model": "gpt-4.1",
                    "candidates": [
                        {"upstream": "relay0", "shadow_percent": 50},
                        {"upstream": "relay1", "canary_percent": 5},
                    ],
                }
            ]
        },
        MigrationSettings,
    )
    source = MigrationSource(book, list)
    encode = msgspec.json.Encoder().encode
    print("| what | range | median ms | worst ms |")
    print("|---|---|---:|---:|")
    for label, span in (("last day", 86400), ("last hour", 3600)):
        period, width = pick_period(span)
        since = now - span

        def view(since: float = since, period: str = period, width: int = width) -> object:
            return encode(
                migration_view(
                    source,
                    settings,
                    since=since,
                    until=now,
                    period=period,  # type: ignore[arg-type]
                    width=width,
                )
            )

        def report(since: float = since) -> object:
            return book.report(since=since, until=now)

        def series(since: float = since, period: str = period, width: int = width) -> object:
            return _series(book.entries, since, now, period, width)  # type: ignore[arg-type]

        parts = (
            ("copy of the book (event loop)", source.snapshot),
            ("whole view, JSON (worker thread)", view),
            ("of which the report", report),
            ("of which the series", series),
        )
        for what, work in parts:
            median, worst = timed(work, args.repeat)
            print(f"| {what} | {label} | {median * 1000:.0f} | {worst * 1000:.0f} |")


if __name__ == "__main__":
    main()
