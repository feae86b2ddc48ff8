"""The operator view's shadow/canary comparison: the migration report over a time range, each
candidate's shares and rollback state, and a series per trial.

The figures are the rows of ``GET /admin/migration/report``: the fleet's counters when the
report is shared through Redis, else this process's comparison book. The series buckets this
process's comparisons by period in one pass, so a trial's p99 can be followed over time next
to its primary's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterable

from tenantware.config import MigrationSettings
from tenantware.dashboard.schemas import MigrationView, TrialPoint, TrialState, TrialStatus
from tenantware.metering.reports import Period, period_label
from tenantware.migration import Comparison, ComparisonBook, ReportRow, percentile
from tenantware.migration.rules import Trial

__all__ = ["MigrationSource", "migration_view"]


class MigrationSource:
    """What the dashboard reads of the gateway's migration runner: its comparison book, the
    trials it rolled back (``runner.report_rolled_back``) and its report (``runner.report``:
    the rows and whether they are the fleet's)."""

    def __init__(
        self,
        book: ComparisonBook,
        rolled_back: Callable[[], Iterable[str]],
        report: Callable[..., Awaitable[tuple[list[ReportRow], bool]]] | None = None,
    ) -> None:
        self.book = book
        self.rolled_back = rolled_back
        self.report = report

    def snapshot(self) -> MigrationSource:
        """A copy of the book and the rollbacks as they are now (a quick copy, in the event
        loop), so the view can be computed in a worker thread while the runner goes on
        adding to the book."""
        entries = list(self.book.entries)
        book = ComparisonBook(max(1, len(entries)))
        book.entries.extend(entries)
        book.dropped.update(self.book.dropped)
        rolled = tuple(self.rolled_back())
        return MigrationSource(book, lambda: rolled)


class _Bucket:
    """Sums of one trial over one period, filled in one pass over the comparisons."""

    __slots__ = ("canaries", "errors", "latencies", "primary_errors", "primary_latencies")

    def __init__(self) -> None:
        self.canaries = self.errors = self.primary_errors = 0
        self.latencies: list[float] = []
        self.primary_latencies: list[float] = []


def _series(
    entries: Iterable[Comparison], since: float, until: float, period: Period, width: int
) -> list[TrialPoint]:
    buckets: dict[tuple[str, int], _Bucket] = {}
    for entry in entries:
        ts = entry.ts
        if not since <= ts < until:
            continue
        key = (entry.trial, int(ts // width) * width)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket()
        bucket.latencies.append(entry.latency_s)
        if entry.outcome != "ok":
            bucket.errors += 1
        if entry.kind == "shadow":
            bucket.primary_latencies.append(entry.primary_latency_s)
            if entry.primary_outcome != "ok":
                bucket.primary_errors += 1
        else:
            bucket.canaries += 1
    return [
        TrialPoint(
            trial=trial,
            period=period_label(start, period),
            shadow_requests=len(bucket.primary_latencies),
            canary_requests=bucket.canaries,
            errors=bucket.errors,
            primary_errors=bucket.primary_errors,
            latency_p99_s=percentile(bucket.latencies, 0.99),
            primary_latency_p99_s=percentile(bucket.primary_latencies, 0.99),
        )
        for (trial, start), bucket in sorted(buckets.items())
    ]


def migration_view(
    source: MigrationSource,
    settings: MigrationSettings,
    *,
    since: float,
    until: float,
    period: Period,
    width: int,
    shared_rows: list[ReportRow] | None = None,
) -> MigrationView:
    """The view over ``since <= ts < until``: trials of ``settings`` first, in their order.
    ``shared_rows``: the fleet's report rows (else the book's)."""
    rolled = set(source.rolled_back())
    book = source.book
    if shared_rows is None:
        found = book.report(since=since, until=until, rolled_back=rolled)
    else:
        found = shared_rows
    rows = {row.trial: row for row in found}
    trials = []
    for rule in settings.rules:
        for candidate in rule.candidates:
            trial = Trial(rule, candidate)
            figures = rows.pop(trial.key, None) or ReportRow(rule=rule.name, trial=trial.key)
            state: TrialState
            if trial.key in rolled:
                state = "rolled_back"
            elif candidate.canary_percent or candidate.shadow_percent:
                state = "active"
            else:
                state = "off"
            trials.append(
                TrialStatus(
                    trial=trial.key,
                    rule=rule.name,
                    model=rule.model,
                    primary=rule.primary,
                    upstream=trial.upstream,
                    candidate_model=trial.model,
                    canary_percent=candidate.canary_percent,
                    shadow_percent=candidate.shadow_percent,
                    state=state,
                    figures=figures,
                )
            )
    for key, figures in rows.items():  # trials the rules no longer name
        _rule, _sep, rest = key.partition("/")
        upstream, _sep, model = rest.partition("/")
        trials.append(
            TrialStatus(
                trial=key,
                rule=figures.rule,
                model=None,
                primary=None,
                upstream=upstream,
                candidate_model=model,
                canary_percent=0.0,
                shadow_percent=0.0,
                state="removed",
                figures=figures,
            )
        )
    entries = list(book.entries)
    return MigrationView(
        since=since,
        until=until,
        period=period,  # type: ignore[arg-type]
        bucket_s=width,
        process=f"{socket.gethostname()}:{os.getpid()}",
        scope="process" if shared_rows is None else "shared",
        oldest_kept=min((entry.ts for entry in entries), default=None),
        trials=trials,
        series=_series(entries, since, until, period, width),
    )
