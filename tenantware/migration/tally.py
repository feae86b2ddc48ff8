"""The comparison report as counters, so that every process can add to one report.

A shared report cannot keep each comparison (every replica would have to send them all to one
place); it keeps, per trial and hour, what the report is made of: counts, sums, and for each
latency a histogram in the ledger's logarithmic buckets (``metering.ledger.histogram``), so a
p50/p99 is within ``RELATIVE_ERROR`` of the exact one. ``Tally`` keeps a process's
comparisons and folds them into such counters when they are sent (``take``); ``row_of``
turns the counters of a period, summed over every process, into the same ``ReportRow`` the
in-process book gives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Final

from tenantware.metering.ledger.histogram import bucket_index, representative
from tenantware.migration.book import Comparison, ReportRow

__all__ = ["HOUR_S", "SIMILARITY_SCALE", "Tally", "TallyKey", "row_of"]

#: Length of one counter period: ``since``/``until`` of a shared report round out to it.
HOUR_S: Final = 3600
#: Similarities are summed as integers of this many parts (exact sums across processes).
SIMILARITY_SCALE: Final = 1_000_000

#: (rule, trial key, hour number): the counters of one trial over one hour.
TallyKey = tuple[str, str, int]


class Tally:
    """The comparisons made since the last ``take``, as counters (one process's share).

    ``add`` only keeps the comparison (it runs on a request's path for a canary); ``take``
    folds what was kept into counters, in the task that sends them.
    """

    __slots__ = ("_drops", "_entries", "_pending")

    def __init__(self) -> None:
        self._entries: list[Comparison] = []
        self._drops: list[tuple[str, str, float]] = []
        self._pending: dict[TallyKey, Counter[str]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries or self._drops or self._pending)

    def add(self, entry: Comparison) -> None:
        self._entries.append(entry)

    def dropped(self, rule: str, trial: str, ts: float) -> None:
        """A shadow copy dropped for want of a free slot."""
        self._drops.append((rule, trial, ts))

    def take(self) -> dict[TallyKey, Counter[str]]:
        """The counters so far, and start again (what the caller failed to send it may
        ``restore``)."""
        entries, self._entries = self._entries, []
        drops, self._drops = self._drops, []
        pending, self._pending = self._pending, {}
        for entry in entries:
            _fold(_counter(pending, entry.rule, entry.trial, entry.ts), entry)
        for rule, trial, ts in drops:
            _counter(pending, rule, trial, ts)["drop"] += 1
        return pending

    def restore(self, pending: Mapping[TallyKey, Counter[str]]) -> None:
        """Put back counters that could not be sent (they go with the next batch)."""
        for key, fields in pending.items():
            self._pending.setdefault(key, Counter()).update(fields)


def _counter(
    pending: dict[TallyKey, Counter[str]], rule: str, trial: str, ts: float
) -> Counter[str]:
    key = (rule, trial, int(ts // HOUR_S))
    counter = pending.get(key)
    if counter is None:
        counter = pending[key] = Counter()
    return counter


def _fold(fields: Counter[str], entry: Comparison) -> None:
    if entry.kind == "canary":
        fields["c.n"] += 1
        fields["c.err"] += entry.outcome != "ok"
        fields[f"c.lat.{bucket_index(entry.latency_s)}"] += 1
        return
    fields["s.n"] += 1
    fields["s.err"] += entry.outcome != "ok"
    fields["p.err"] += entry.primary_outcome != "ok"
    fields[f"s.lat.{bucket_index(entry.latency_s)}"] += 1
    fields[f"p.lat.{bucket_index(entry.primary_latency_s)}"] += 1
    if entry.ttft_s is not None:
        fields[f"s.ttft.{bucket_index(entry.ttft_s)}"] += 1
    if entry.primary_ttft_s is not None:
        fields[f"p.ttft.{bucket_index(entry.primary_ttft_s)}"] += 1
    fields["s.tok"] += entry.input_tokens + entry.output_tokens
    fields["p.tok"] += entry.primary_input_tokens + entry.primary_output_tokens
    fields["s.cost"] += entry.cost_nanousd
    fields["p.cost"] += entry.primary_cost_nanousd
    if entry.exact is not None:
        fields["cmp"] += 1
        fields["exact"] += bool(entry.exact)
        fields["sim"] += round((entry.similarity or 0.0) * SIMILARITY_SCALE)
        fields["tools"] += bool(entry.same_tools)


def _pct(fields: Mapping[str, int], name: str, q: float) -> float | None:
    """The nearest-rank percentile ``q`` of histogram ``name`` (its bucket's middle)."""
    prefix = name + "."
    counts = sorted(
        (int(field[len(prefix) :]), n) for field, n in fields.items() if field.startswith(prefix)
    )
    total = sum(n for _i, n in counts)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))  # as the in-process book's nearest rank
    seen = 0
    for index, n in counts:
        seen += n
        if seen >= rank:
            return representative(index)
    return representative(counts[-1][0])  # pragma: no cover - rank <= total


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def row_of(rule: str, trial: str, fields: Mapping[str, int], rolled: bool) -> ReportRow:
    """The report row of summed counters (latencies as their bucket's middle)."""
    row = ReportRow(rule=rule, trial=trial, rolled_back=rolled)
    row.shadow_dropped = fields.get("drop", 0)
    n = fields.get("s.n", 0)
    row.shadow_requests = n
    if n:
        row.shadow_error_rate = _rate(fields.get("s.err", 0), n)
        row.primary_error_rate = _rate(fields.get("p.err", 0), n)
        row.shadow_latency_p50_s = _pct(fields, "s.lat", 0.50)
        row.shadow_latency_p99_s = _pct(fields, "s.lat", 0.99)
        row.primary_latency_p50_s = _pct(fields, "p.lat", 0.50)
        row.primary_latency_p99_s = _pct(fields, "p.lat", 0.99)
        row.shadow_ttft_p50_s = _pct(fields, "s.ttft", 0.50)
        row.shadow_ttft_p99_s = _pct(fields, "s.ttft", 0.99)
        row.primary_ttft_p50_s = _pct(fields, "p.ttft", 0.50)
        row.primary_ttft_p99_s = _pct(fields, "p.ttft", 0.99)
        row.shadow_tokens_per_request = fields.get("s.tok", 0) / n
        row.primary_tokens_per_request = fields.get("p.tok", 0) / n
        row.shadow_cost_nanousd = fields.get("s.cost", 0)
        row.primary_cost_nanousd = fields.get("p.cost", 0)
        row.shadow_cost_per_request_nanousd = row.shadow_cost_nanousd / n
        row.primary_cost_per_request_nanousd = row.primary_cost_nanousd / n
        compared = fields.get("cmp", 0)
        if compared:
            row.exact_match_rate = _rate(fields.get("exact", 0), compared)
            row.similarity_mean = fields.get("sim", 0) / SIMILARITY_SCALE / compared
            row.same_tools_rate = _rate(fields.get("tools", 0), compared)
    canaries = fields.get("c.n", 0)
    if canaries:
        row.canary_requests = canaries
        row.canary_error_rate = _rate(fields.get("c.err", 0), canaries)
        row.canary_latency_p50_s = _pct(fields, "c.lat", 0.50)
        row.canary_latency_p99_s = _pct(fields, "c.lat", 0.99)
    return row
