"""Prometheus metrics and the canonical per-request log line, fed from usage records.

Both run in the ledger writer, once per flushed batch, not on the request path: a metric lags
by at most one flush interval (100 ms by default). Labels stay bounded: tenants come from the
configuration, models outside the catalogue are counted as ``other``, outcomes and rejection
reasons are fixed vocabularies. The log line never holds a prompt or a key (records have none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import structlog

from tenantware.billing import NOT_BILLED
from tenantware.context import Outcome
from tenantware.ledger.record import UsageRecord
from tenantware.metrics import (
    COST_NANOUSD,
    REJECTIONS,
    REQUEST_SECONDS,
    REQUESTS,
    TOKENS,
    TTFT_SECONDS,
)
from tenantware.state import LiveConfig

__all__ = ["log_records", "metrics_observer"]

request_log = structlog.get_logger("tenantware.request")


#: Rejections the refusing layer counts itself, with a finer reason (the limit, the queue):
#: counting their records again would double ``tenantware_rejections_total``. Queue waits
#: likewise are observed by the admission layer, not here.
_COUNTED_BY_THEIR_LAYER: Final = frozenset(
    {Outcome.REJECTED_QUOTA, Outcome.REJECTED_BUDGET, Outcome.REJECTED_QUEUE}
)


def metrics_observer(live: LiveConfig) -> Callable[[Sequence[UsageRecord]], None]:
    """An observer that updates the Prometheus metrics from a batch of records."""

    def observe(records: Sequence[UsageRecord]) -> None:
        snapshot = live.current
        models = snapshot.catalogue.models
        tenants = {t.id for t in snapshot.config.tenants}
        for r in records:
            tenant = r.tenant if r.tenant in tenants else "other"
            model = r.model_served or r.model_requested
            model = model if model in models else "other"
            REQUESTS.labels(tenant, model, r.outcome).inc()
            REQUEST_SECONDS.labels(tenant, model).observe(r.latency_s)
            if r.outcome in NOT_BILLED:
                if r.outcome not in _COUNTED_BY_THEIR_LAYER:
                    REJECTIONS.labels(tenant, r.outcome).inc()
                continue
            if r.input_tokens:
                TOKENS.labels(tenant, model, "input").inc(r.input_tokens)
            if r.output_tokens:
                TOKENS.labels(tenant, model, "output").inc(r.output_tokens)
            if r.cached_tokens:
                TOKENS.labels(tenant, model, "cached").inc(r.cached_tokens)
            if r.cost_nanousd:
                COST_NANOUSD.labels(tenant, model).inc(r.cost_nanousd)
            if r.ttft_s is not None:
                TTFT_SECONDS.labels(tenant, model).observe(r.ttft_s)

    return observe


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def log_records(records: Sequence[UsageRecord]) -> None:
    """One JSON-ready ``request`` event per record (structlog; the app configures output)."""
    for r in records:
        request_log.info(
            "request",
            request_id=r.request_id,
            tenant_id=r.tenant,
            cost_center=r.cost_center,
            key_id=r.key_id,
            model=r.model_requested,
            model_served=r.model_served,
            upstream=r.upstream,
            status=r.status,
            outcome=r.outcome,
            stream=r.stream,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            cached_tokens=r.cached_tokens,
            estimated=r.estimated,
            cost_nanousd=r.cost_nanousd,
            charged_nanousd=r.charged_nanousd,
            latency_ms=_ms(r.latency_s),
            upstream_latency_ms=_ms(r.upstream_latency_s),
            ttft_ms=_ms(r.ttft_s),
            queue_wait_ms=_ms(r.queue_wait_s),
        )
