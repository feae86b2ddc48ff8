"""Prometheus metrics and the canonical per-request log line, fed from usage records.

Both run in the ledger writer, once per flushed batch, not on the request path: a metric lags
by at most one flush interval (``metering.flush_interval_s``). Labels stay bounded: tenants
come from the configuration, models outside the catalogue are counted as ``other``, outcomes
and rejection reasons are fixed vocabularies. The log line never holds a prompt or a key
(records have none).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import msgspec
import structlog

from tenantware.context import Outcome
from tenantware.logs import bulk_sink
from tenantware.metering.billing import NOT_BILLED, SHADOW
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metrics import (
    ADDED_LATENCY_SECONDS,
    COST_NANOUSD,
    REJECTIONS,
    REQUEST_SECONDS,
    REQUESTS,
    TOKENS,
    TTFT_SECONDS,
    USAGE_ANOMALIES,
)
from tenantware.state import LiveConfig

__all__ = ["AnomalyReporter", "log_records", "metrics_observer"]

request_log = structlog.get_logger("tenantware.request")
log = structlog.get_logger("tenantware.metering")


class AnomalyReporter:
    """Counts unusable upstream usage per (upstream, kind) and logs it at a bounded rate.

    The first anomaly of a kind from an upstream is logged at once; later ones at most every
    ``interval_s`` with how many were not logged in between: a misbehaving upstream shows up
    in the logs without flooding them. Runs on the request path, but only for anomalies.
    """

    __slots__ = ("_clock", "_logged", "interval_s")

    def __init__(
        self, *, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        #: (upstream, kind) -> [time last logged, occurrences since]; upstreams are bounded
        #: by the configuration, kinds by the vocabulary.
        self._logged: dict[tuple[str, str], list[float]] = {}

    def report(
        self, upstream: str, kinds: Sequence[str], *, request_id: str, tenant: str, model: str
    ) -> None:
        now = self._clock()
        for kind in kinds:
            USAGE_ANOMALIES.labels(upstream, kind).inc()
            entry = self._logged.get((upstream, kind))
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                continue
            self._logged[(upstream, kind)] = [now, 0]
            log.warning(
                "upstream usage unusable; clamped or estimated",
                upstream=upstream,
                kind=kind,
                request_id=request_id,
                tenant_id=tenant,
                model=model,
                not_logged_since=int(entry[1]) if entry is not None else 0,
            )


#: Rejections the refusing layer counts itself, with a finer reason (the limit, the queue):
#: counting their records again would double ``tenantware_rejections_total``. Queue waits
#: likewise are observed by the admission layer, not here.
_COUNTED_BY_THEIR_LAYER: Final = frozenset(
    {Outcome.REJECTED_QUOTA, Outcome.REJECTED_BUDGET, Outcome.REJECTED_QUEUE}
)

#: Bound on cached label sets (tenants x models x outcomes); past it the cache starts over.
_MAX_CHILDREN: Final = 10_000


#: Positions of the per-batch sums in ``metrics_observer`` and the children they go to.
_REQUESTS, _INPUT, _OUTPUT, _CACHED, _COST, _REJECTIONS = range(6)
_SUMMED: Final = (
    (_INPUT, "input"),
    (_OUTPUT, "output"),
    (_CACHED, "cached"),
    (_COST, "cost"),
    (_REJECTIONS, "rejections"),
)


class _Children:
    """The metric children one (tenant, model, outcome) updates, each looked up once.

    Only ``requests`` and ``seconds`` are created up front (every record updates them); the
    others on first use, so no series is exported before it has a value (as before).
    """

    __slots__ = ("_lazy", "model", "outcome", "requests", "seconds", "tenant")

    def __init__(self, tenant: str, model: str, outcome: str) -> None:
        self.tenant = tenant
        self.model = model
        self.outcome = outcome
        self.requests = REQUESTS.labels(tenant, model, outcome)
        self.seconds = REQUEST_SECONDS.labels(tenant, model)
        self._lazy: dict[str, Any] = {}

    def child(self, name: str) -> Any:
        found = self._lazy.get(name)
        if found is None:
            found = self._lazy[name] = self._make(name)
        return found

    def _make(self, name: str) -> Any:
        tenant, model = self.tenant, self.model
        if name == "rejections":
            return REJECTIONS.labels(tenant, self.outcome)
        if name in ("input", "output", "cached"):
            return TOKENS.labels(tenant, model, name)
        if name == "cost":
            return COST_NANOUSD.labels(tenant, model)
        if name == "added":
            return ADDED_LATENCY_SECONDS.labels(tenant, model)
        return TTFT_SECONDS.labels(tenant, model)


def metrics_observer(live: LiveConfig) -> Callable[[Sequence[UsageRecord]], None]:
    """An observer that updates the Prometheus metrics from a batch of records."""

    #: Metric children per (tenant, model, outcome): ``labels()`` validates and hashes its
    #: arguments under a lock on every call; the label sets of a gateway are few and stable.
    children: dict[tuple[str, str, str], _Children] = {}

    def observe(records: Sequence[UsageRecord]) -> None:
        snapshot = live.current
        models = snapshot.catalogue.models
        tenants = {t.id for t in snapshot.config.tenants}
        # Counters are summed per label set and incremented once per batch (each ``inc``
        # takes a lock); histograms need every value and are observed per record.
        sums: dict[_Children, list[int]] = {}
        for r in records:
            tenant = r.tenant if r.tenant in tenants else "other"
            model = r.model_served or r.model_requested
            model = model if model in models else "other"
            key = (tenant, model, r.outcome)
            c = children.get(key)
            if c is None:
                if len(children) >= _MAX_CHILDREN:
                    children.clear()
                c = children[key] = _Children(tenant, model, r.outcome)
            counts = sums.get(c)
            if counts is None:
                counts = sums[c] = [0, 0, 0, 0, 0, 0]
            counts[_REQUESTS] += 1
            c.seconds.observe(r.latency_s)
            if r.outcome == SHADOW:
                continue  # a migration trial's copy: counted, its cost is not the tenant's
            if r.upstream_latency_s is not None and not r.stream:
                c.child("added").observe(max(0.0, r.latency_s - r.upstream_latency_s))
            if r.outcome in NOT_BILLED:
                if r.outcome not in _COUNTED_BY_THEIR_LAYER:
                    counts[_REJECTIONS] += 1
                continue
            counts[_INPUT] += r.input_tokens
            counts[_OUTPUT] += r.output_tokens
            counts[_CACHED] += r.cached_tokens
            counts[_COST] += r.cost_nanousd
            if r.ttft_s is not None:
                c.child("ttft").observe(r.ttft_s)
        for c, counts in sums.items():
            c.requests.inc(counts[_REQUESTS])
            # A series appears with its first value, never as a zero.
            for index, name in _SUMMED:
                if counts[index]:
                    c.child(name).inc(counts[index])

    return observe


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _RequestLine(msgspec.Struct):
    """The fields of the request log line, then the ones structlog's chain adds (``event``,
    ``level``, ``timestamp``): msgspec encodes a struct built positionally faster than a dict
    built key by key."""

    request_id: str
    tenant_id: str
    cost_center: str
    key_id: str
    model: str
    model_served: str
    upstream: str
    status: int
    outcome: str
    stream: bool
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    estimated: bool
    usage_invalid: bool
    cost_nanousd: int
    charged_nanousd: int
    latency_ms: float | None
    upstream_latency_ms: float | None
    ttft_ms: float | None
    queue_wait_ms: float | None
    event: str
    level: str
    timestamp: str


def _request_lines(records: Sequence[UsageRecord], stamp: str) -> Iterator[_RequestLine]:
    for r in records:
        yield _RequestLine(
            r.request_id,
            r.tenant,
            r.cost_center,
            r.key_id,
            r.model_requested,
            r.model_served,
            r.upstream,
            r.status,
            r.outcome,
            r.stream,
            r.input_tokens,
            r.output_tokens,
            r.cached_tokens,
            r.estimated,
            r.usage_invalid,
            r.cost_nanousd,
            r.charged_nanousd,
            _ms(r.latency_s),
            _ms(r.upstream_latency_s),
            _ms(r.ttft_s),
            _ms(r.queue_wait_s),
            "request",
            "info",
            stamp,
        )


#: What structlog's chain adds to an event itself.
_ADDED_BY_STRUCTLOG: Final = ("event", "level", "timestamp")


def _request_fields(r: UsageRecord) -> dict[str, Any]:
    """The line's fields as ``request_log.info`` takes them (the path without the bulk sink)."""
    (line,) = _request_lines((r,), "")
    fields = msgspec.structs.asdict(line)
    for name in _ADDED_BY_STRUCTLOG:
        del fields[name]
    return fields


def log_records(records: Sequence[UsageRecord]) -> None:
    """One JSON-ready ``request`` event per record: through structlog (the app configures the
    output), or in one write where ``tenantware.logs`` owns it (``tenantware serve``)."""
    bulk = bulk_sink()
    if bulk is not None:
        stamp = bulk.info_stamp()
        if stamp is not None:
            bulk.write_lines(_request_lines(records, stamp))
        return
    for r in records:
        request_log.info("request", **_request_fields(r))
