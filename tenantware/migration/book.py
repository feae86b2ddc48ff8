"""The comparison report: each shadow call next to its primary, each canary call, summed up.

One ``Comparison`` per shadow call (the candidate's figures and the primary's on the same
request, and how their answers agree) and per canary call (the candidate's figures only). The
book keeps the last ``report_size`` of them in this process; ``report`` sums a period of them
per rule and candidate. The ledger holds the same calls for billing (outcome ``shadow``).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

__all__ = ["Comparison", "ComparisonBook", "ReportRow", "percentile", "report_csv"]

Kind = Literal["shadow", "canary"]


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    """One call to a candidate and, for a shadow, its primary's figures on the same request."""

    kind: Kind
    ts: float
    rule: str
    trial: str
    tenant: str
    request_id: str
    stream: bool = False
    status: int = 0
    #: ``ok``, ``error`` (a failed answer) or ``timeout`` (the shadow's own limit).
    outcome: str = "ok"
    latency_s: float = 0.0
    ttft_s: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanousd: int = 0
    primary_status: int = 0
    #: ``ok`` or ``error`` (no answer, 429, 5xx, a stream cut), as for the candidate.
    primary_outcome: str = "ok"
    primary_latency_s: float = 0.0
    primary_ttft_s: float | None = None
    primary_input_tokens: int = 0
    primary_output_tokens: int = 0
    primary_cost_nanousd: int = 0
    #: Agreement with the primary's answer (``None`` unless both answered).
    exact: bool | None = None
    similarity: float | None = None
    same_tools: bool | None = None


class ReportRow(msgspec.Struct, kw_only=True):
    """Figures of one candidate of one rule over the period (latencies in seconds)."""

    rule: str
    trial: str
    shadow_requests: int = 0
    shadow_dropped: int = 0
    shadow_error_rate: float | None = None
    primary_error_rate: float | None = None
    shadow_latency_p50_s: float | None = None
    shadow_latency_p99_s: float | None = None
    primary_latency_p50_s: float | None = None
    primary_latency_p99_s: float | None = None
    shadow_ttft_p50_s: float | None = None
    shadow_ttft_p99_s: float | None = None
    primary_ttft_p50_s: float | None = None
    primary_ttft_p99_s: float | None = None
    shadow_tokens_per_request: float | None = None
    primary_tokens_per_request: float | None = None
    shadow_cost_nanousd: int = 0
    primary_cost_nanousd: int = 0
    shadow_cost_per_request_nanousd: float | None = None
    primary_cost_per_request_nanousd: float | None = None
    exact_match_rate: float | None = None
    similarity_mean: float | None = None
    same_tools_rate: float | None = None
    canary_requests: int = 0
    canary_error_rate: float | None = None
    canary_latency_p50_s: float | None = None
    canary_latency_p99_s: float | None = None
    rolled_back: bool = False


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``values`` (``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


class ComparisonBook:
    """The last ``size`` comparisons of this process, and the shadows dropped per trial."""

    def __init__(self, size: int = 100_000) -> None:
        self.entries: deque[Comparison] = deque(maxlen=size)
        self.dropped: Counter[str] = Counter()

    def resize(self, size: int) -> None:
        if self.entries.maxlen != size:
            self.entries = deque(self.entries, maxlen=size)

    def add(self, comparison: Comparison) -> None:
        self.entries.append(comparison)

    def report(
        self,
        *,
        since: float = 0.0,
        until: float = math.inf,
        rule: str | None = None,
        rolled_back: Iterable[str] = (),
    ) -> list[ReportRow]:
        """Rows per (rule, trial) over ``since <= ts < until``, sorted by rule and trial."""
        groups: dict[tuple[str, str], list[Comparison]] = {}
        for entry in self.entries:
            if since <= entry.ts < until and (rule is None or entry.rule == rule):
                groups.setdefault((entry.rule, entry.trial), []).append(entry)
        for trial_key in self.dropped:
            name = trial_key.split("/", 1)[0]
            if rule is None or name == rule:
                groups.setdefault((name, trial_key), [])
        rolled = set(rolled_back)
        return [
            _row(name, trial, entries, self.dropped[trial], trial in rolled)
            for (name, trial), entries in sorted(groups.items())
        ]


def _row(rule: str, trial: str, entries: list[Comparison], dropped: int, rolled: bool) -> ReportRow:
    shadows = [e for e in entries if e.kind == "shadow"]
    canaries = [e for e in entries if e.kind == "canary"]
    row = ReportRow(rule=rule, trial=trial, shadow_dropped=dropped, rolled_back=rolled)
    n = len(shadows)
    row.shadow_requests = n
    if n:
        row.shadow_error_rate = _rate(sum(e.outcome != "ok" for e in shadows), n)
        row.primary_error_rate = _rate(sum(e.primary_outcome != "ok" for e in shadows), n)
        row.shadow_latency_p50_s = percentile([e.latency_s for e in shadows], 0.50)
        row.shadow_latency_p99_s = percentile([e.latency_s for e in shadows], 0.99)
        row.primary_latency_p50_s = percentile([e.primary_latency_s for e in shadows], 0.50)
        row.primary_latency_p99_s = percentile([e.primary_latency_s for e in shadows], 0.99)
        ttft = [e.ttft_s for e in shadows if e.ttft_s is not None]
        primary_ttft = [e.primary_ttft_s for e in shadows if e.primary_ttft_s is not None]
        row.shadow_ttft_p50_s, row.shadow_ttft_p99_s = percentile(ttft, 0.5), percentile(ttft, 0.99)
        row.primary_ttft_p50_s = percentile(primary_ttft, 0.5)
        row.primary_ttft_p99_s = percentile(primary_ttft, 0.99)
        row.shadow_tokens_per_request = sum(e.input_tokens + e.output_tokens for e in shadows) / n
        row.primary_tokens_per_request = (
            sum(e.primary_input_tokens + e.primary_output_tokens for e in shadows) / n
        )
        row.shadow_cost_nanousd = sum(e.cost_nanousd for e in shadows)
        row.primary_cost_nanousd = sum(e.primary_cost_nanousd for e in shadows)
        row.shadow_cost_per_request_nanousd = row.shadow_cost_nanousd / n
        row.primary_cost_per_request_nanousd = row.primary_cost_nanousd / n
        compared = [e for e in shadows if e.exact is not None]
        if compared:
            row.exact_match_rate = _rate(sum(bool(e.exact) for e in compared), len(compared))
            row.similarity_mean = sum(e.similarity or 0.0 for e in compared) / len(compared)
            row.same_tools_rate = _rate(sum(bool(e.same_tools) for e in compared), len(compared))
    if canaries:
        row.canary_requests = len(canaries)
        row.canary_error_rate = _rate(sum(e.outcome != "ok" for e in canaries), len(canaries))
        row.canary_latency_p50_s = percentile([e.latency_s for e in canaries], 0.5)
        row.canary_latency_p99_s = percentile([e.latency_s for e in canaries], 0.99)
    return row


def report_csv(rows: Sequence[ReportRow]) -> str:
    """The report as CSV, one line per row, columns in ``ReportRow``'s field order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    fields = ReportRow.__struct_fields__
    writer.writerow(fields)
    for row in rows:
        writer.writerow(["" if (v := getattr(row, f)) is None else v for f in fields])
    return out.getvalue()
