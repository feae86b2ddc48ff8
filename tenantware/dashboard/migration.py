"""The operator view's shadow/canary comparison: the migration report of this process over a
time range, each candidate's shares and rollback state, and a series per trial.

The figures are the comparison book's (``ComparisonBook.report``, the same rows as
``GET /admin/migration/report``); the series buckets the same comparisons by period in one
pass, so a trial's p99 can be followed over time next to its primary's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable

from tenantware.config import MigrationSettings
from tenantware.dashboard.schemas import MigrationView, TrialPoint, TrialState, TrialStatus
from tenantware.metering.reports import Period, period_label
from tenantware.migration import Comparison, ComparisonBook, ReportRow, percentile
from tenantware.migration.rules import Trial

__all__ = ["MigrationSource", "migration_view"]


class MigrationSource:
    """What the dashboard reads of the gateway's migration runner: its comparison book and
    the trials it rolled back (``runner.report_rolled_back``)."""

    def __init__(self, book: ComparisonBook, rolled_back: Callable[[], Iterable[str]]) -> None:
        self.book = book
        self.rolled_back = rolled_back


def _series(
    entries: Iterable[Comparison], since: float, until: float, period: Period, width: int
) -> list[TrialPoint]:
    groups: dict[tuple[str, int], list[Comparison]] = {}
    for entry in entries:
        if since <= entry.ts < until:
            bucket = int(entry.ts // width) * width
            groups.setdefault((entry.trial, bucket), []).append(entry)
    points = []
    for (trial, bucket), calls in sorted(groups.items()):
        shadows = [c for c in calls if c.kind == "shadow"]
        points.append(
            TrialPoint(
                trial=trial,
                period=period_label(bucket, period),
                shadow_requests=len(shadows),
                canary_requests=len(calls) - len(shadows),
                errors=sum(c.outcome != "ok" for c in calls),
                primary_errors=sum(c.primary_outcome != "ok" for c in shadows),
                latency_p99_s=percentile([c.latency_s for c in calls], 0.99),
                primary_latency_p99_s=percentile([c.primary_latency_s for c in shadows], 0.99),
            )
        )
    return points


def migration_view(
    source: MigrationSource,
    settings: MigrationSettings,
    *,
    since: float,
    until: float,
    period: Period,
    width: int,
) -> MigrationView:
    """The view over ``since <= ts < until``: trials of ``settings`` first, in their order."""
    rolled = set(source.rolled_back())
    book = source.book
    rows = {row.trial: row for row in book.report(since=since, until=until, rolled_back=rolled)}
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
        oldest_kept=min((entry.ts for entry in entries), default=None),
        trials=trials,
        series=_series(entries, since, until, period, width),
    )
