"""Prometheus metrics of every layer, defined once in one registry that ``/metrics`` exposes.

Labels are bounded: tenant ids and models come from the configuration (unknown models are
rejected before any metric is touched), reasons and outcomes are fixed vocabularies.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "ADDED_LATENCY_SECONDS",
    "BALANCE_LOW",
    "BALANCE_NANOUSD",
    "BREAKER_STATE",
    "COST_NANOUSD",
    "LEDGER_DEAD_LETTERS",
    "LEDGER_FAILING_SECONDS",
    "LEDGER_STUCK",
    "MIGRATION_ROLLBACKS",
    "QUEUE_DEPTH",
    "QUEUE_WAIT_SECONDS",
    "REGISTRY",
    "REGISTRY_STALE",
    "REGISTRY_VERSION",
    "REJECTIONS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "SEATS_IN_USE",
    "SHADOW_CALLS",
    "STORE_FAILURES",
    "TOKENS",
    "TTFT_SECONDS",
    "USAGE_ANOMALIES",
    "exposition",
    "forget_this_process",
]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "tenantware_requests",
    "Requests by tenant, model served and outcome.",
    ["tenant", "model", "outcome"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "tenantware_tokens",
    "Tokens by tenant, model and kind (input, output, cached).",
    ["tenant", "model", "kind"],
    registry=REGISTRY,
)
COST_NANOUSD = Counter(
    "tenantware_cost_nanousd",
    "Cost charged in nano-dollars (1e-9 USD) by tenant and model.",
    ["tenant", "model"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "tenantware_request_seconds",
    "Total request latency through the gateway.",
    ["tenant", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ADDED_LATENCY_SECONDS = Histogram(
    "tenantware_added_latency_seconds",
    "Latency the gateway added to a non-streamed request: its total minus the upstream's "
    "answer time.",
    ["tenant", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
TTFT_SECONDS = Histogram(
    "tenantware_time_to_first_token_seconds",
    "Time to the first streamed byte.",
    ["tenant", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "tenantware_rejections",
    "Requests rejected by a policy layer, by tenant and reason.",
    ["tenant", "reason"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "tenantware_queue_depth",
    "Requests waiting in the fair queue, by tenant.",
    ["tenant"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "tenantware_queue_wait_seconds",
    "Time spent waiting for admission, by tenant.",
    ["tenant"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
SEATS_IN_USE = Gauge(
    "tenantware_seats_in_use",
    "Upstream seats held, by tenant.",
    ["tenant"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "tenantware_breaker_state",
    "Circuit state per upstream deployment: 0 closed, 1 half-open, 2 open.",
    ["upstream", "model"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
STORE_FAILURES = Counter(
    "tenantware_store_failures",
    "Shared-store (Redis) calls that failed, by layer and the failure policy applied.",
    ["layer", "policy"],
    registry=REGISTRY,
)
USAGE_ANOMALIES = Counter(
    "tenantware_usage_anomalies",
    "Upstream usage reports the gateway could not bill as given, by upstream and kind "
    "(negative, too_large, malformed, inconsistent: clamped or estimated; missing: estimated).",
    ["upstream", "kind"],
    registry=REGISTRY,
)
LEDGER_STUCK = Gauge(
    "tenantware_ledger_stuck",
    "1 while the usage ledger has failed writes for longer than its stuck threshold with "
    "records waiting, else 0.",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
LEDGER_FAILING_SECONDS = Gauge(
    "tenantware_ledger_failing_seconds",
    "Seconds the usage ledger has been failing writes while records wait (0 when healthy).",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
LEDGER_DEAD_LETTERS = Counter(
    "tenantware_ledger_dead_letters",
    "Usage records a ledger refused for good, set aside in the dead-letter file.",
    registry=REGISTRY,
)

REGISTRY_VERSION = Gauge(
    "tenantware_registry_version",
    "Version of the tenant registry this process serves from.",
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
REGISTRY_STALE = Gauge(
    "tenantware_registry_stale",
    "1 while the shared tenant registry is unreachable and the last copy serves, else 0.",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)

SHADOW_CALLS = Counter(
    "tenantware_shadow_calls",
    "Shadow copies by migration trial (rule/upstream/model) and result: ok, error, timeout, "
    "dropped (the trial's concurrency bound was reached).",
    ["trial", "result"],
    registry=REGISTRY,
)
MIGRATION_ROLLBACKS = Counter(
    "tenantware_migration_rollbacks",
    "Migration candidates rolled back automatically, by trial (rule/upstream/model).",
    ["trial"],
    registry=REGISTRY,
)
BALANCE_NANOUSD = Gauge(
    "tenantware_balance_nanousd",
    "Prepaid balance of a tenant as this process last saw it (nano-dollars).",
    ["tenant"],
    multiprocess_mode="livemostrecent",
    registry=REGISTRY,
)
BALANCE_LOW = Gauge(
    "tenantware_balance_low",
    "1 while a prepaid tenant's balance is below its low-balance threshold, else 0.",
    ["tenant"],
    multiprocess_mode="livemostrecent",
    registry=REGISTRY,
)

#: Set (by ``tenantware serve --workers N``) when several processes share the metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition() -> tuple[str, bytes]:
    """``/metrics``' content type and body: this process's registry, or every worker's."""
    if not os.environ.get(MULTIPROC_ENV):
        return CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
    return CONTENT_TYPE_LATEST, generate_latest(merged)


def forget_this_process() -> None:
    """Drop this worker's live gauges from the shared files (a worker that stops)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
