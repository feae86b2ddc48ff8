"""The rules in force (configured or the defaults) and how a usage record counts for each.

A record-based rule (``WINDOW_KINDS``) counts, per group and time bucket, the records it
judges (``counts``) and those that are bad (``bad``): an error, or a value over the
threshold. A percentile over a threshold is a share of bad records over ``1 - p``, which is
exact and needs two integers per bucket instead of a histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Final

from tenantware.config import WINDOW_KINDS, AlertRule, AlertSettings
from tenantware.context import Outcome
from tenantware.metering.ledger.record import UsageRecord

__all__ = [
    "DEFAULT_ALERT_RULES",
    "ERROR_OUTCOMES",
    "NOT_SERVED",
    "WindowRule",
    "default_summary",
    "rules_in_force",
]

#: Outcomes a client sees as the gateway's or the upstream's failure.
ERROR_OUTCOMES: Final = frozenset(
    {Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR, Outcome.BREAKER_OPEN}
)
#: Refusals for the client's own reasons: not part of an error rate or a latency.
NOT_SERVED: Final = frozenset(
    {
        Outcome.REJECTED_AUTH,
        Outcome.REJECTED_REQUEST,
        Outcome.REJECTED_QUOTA,
        Outcome.REJECTED_BUDGET,
        Outcome.REJECTED_QUEUE,
    }
)
_QUEUE_JUDGED: Final = NOT_SERVED - {Outcome.REJECTED_QUEUE}

#: Shipped rules, used while ``alerts.rules`` is unset (and only once a destination exists).
DEFAULT_ALERT_RULES: Final = (
    AlertRule(id="error-rate", kind="error_rate", scope="tenant", threshold=0.05, window_s=300),
    AlertRule(
        id="added-latency",
        kind="latency",
        metric="added_latency",
        threshold=0.15,
        percentile=95,
        window_s=300,
    ),
    AlertRule(
        id="ttft", kind="latency", metric="ttft", scope="model", threshold=10.0, window_s=300
    ),
    AlertRule(id="queue-wait", kind="queue_wait", scope="tenant", threshold=30.0, window_s=300),
    AlertRule(id="daily-budget", kind="spend", scope="tenant", threshold=0.8, budget="daily"),
    AlertRule(id="monthly-budget", kind="spend", scope="tenant", threshold=0.8, budget="monthly"),
    AlertRule(id="low-balance", kind="balance", scope="tenant", threshold=0),
    AlertRule(
        id="circuit-open", kind="circuit_open", scope="upstream", threshold=60, severity="critical"
    ),
    AlertRule(id="ledger-spilling", kind="ledger_spilling", threshold=0, severity="critical"),
    AlertRule(id="store-failover", kind="store_failover", threshold=0, severity="critical"),
)


def rules_in_force(settings: AlertSettings) -> tuple[AlertRule, ...]:
    """The enabled rules: the configured ones, or the defaults when none are."""
    rules = DEFAULT_ALERT_RULES if settings.rules is None else settings.rules
    return tuple(rule for rule in rules if rule.enabled)


def default_summary(rule: AlertRule) -> str:
    """A one-line description of ``rule`` for messages without a configured summary."""
    if rule.summary:
        return rule.summary
    kind = rule.kind
    if kind == "error_rate":
        return f"error rate over {rule.threshold:.2%} in {rule.window_s:g} s"
    if kind == "latency":
        what = rule.metric.replace("_", " ")
        return f"p{rule.percentile:g} {what} over {rule.threshold:g} s in {rule.window_s:g} s"
    if kind == "queue_wait":
        return f"p{rule.percentile:g} queue wait over {rule.threshold:g} s in {rule.window_s:g} s"
    if kind == "spend":
        return f"spend reached {rule.threshold:.0%} of the {rule.budget} budget"
    if kind == "balance":
        if rule.threshold == 0:
            return "prepaid balance under the tenant's low-balance threshold"
        return f"prepaid balance under {rule.threshold:g} USD"
    if kind == "circuit_open":
        return f"circuit open for more than {rule.threshold:g} s"
    if kind == "ledger_spilling":
        return f"usage ledger failing (records spilling) for more than {rule.threshold:g} s"
    return f"shared store unreachable (failure policy in force) for more than {rule.threshold:g} s"


def _added_latency(r: UsageRecord) -> float | None:
    # Streamed answers are left out: their total includes the whole stream.
    if r.upstream_latency_s is None or r.stream:
        return None
    return max(0.0, r.latency_s - r.upstream_latency_s)


def _value_of(rule: AlertRule) -> Callable[[UsageRecord], float | None]:
    if rule.kind == "queue_wait":
        return attrgetter("queue_wait_s")
    if rule.metric == "ttft":
        return attrgetter("ttft_s")
    if rule.metric == "added_latency":
        return _added_latency
    return attrgetter("latency_s")


def _served_model(r: UsageRecord) -> str:
    return r.model_served or r.model_requested


class WindowRule:
    """A record-based rule compiled once per configuration version (``judge`` runs for every
    record, in the ledger writer: what it needs is looked up here, once)."""

    __slots__ = (
        "_errors",
        "_group",
        "_match",
        "_needs_group",
        "_skip",
        "_threshold",
        "_value",
        "rule",
    )

    def __init__(self, rule: AlertRule, tiers: Mapping[str, str]) -> None:
        assert rule.kind in WINDOW_KINDS
        self.rule = rule
        self._match = frozenset(rule.match)
        self._skip = _QUEUE_JUDGED if rule.kind == "queue_wait" else NOT_SERVED
        self._value = _value_of(rule)
        self._errors = rule.kind == "error_rate"
        self._threshold = rule.threshold
        self._needs_group = rule.scope != "global"
        scope = rule.scope
        self._group: Callable[[UsageRecord], str]
        if scope == "tenant":
            self._group = attrgetter("tenant")
        elif scope == "tier":
            self._group = lambda r: tiers.get(r.tenant, "")
        elif scope == "model":
            self._group = _served_model
        elif scope == "upstream":
            self._group = attrgetter("upstream")
        else:
            self._group = lambda r: ""

    def judge(self, record: UsageRecord) -> tuple[str, bool] | None:
        """``(group, bad)`` when ``record`` counts for this rule, else ``None``."""
        outcome = record.outcome
        if outcome in self._skip:
            return None
        group = self._group(record)
        if self._needs_group and (not group or (self._match and group not in self._match)):
            return None
        if self._errors:
            return group, outcome in ERROR_OUTCOMES
        if outcome == Outcome.REJECTED_QUEUE:
            return group, True
        value = self._value(record)
        if value is None:
            return None
        return group, value > self._threshold

    def firing(self, requests: int, bad: int) -> tuple[float, bool]:
        """``(value, firing)`` of a window with ``requests`` judged, ``bad`` of them bad: the
        error rate, or the share of records over the threshold."""
        if requests <= 0:
            return 0.0, False
        share = bad / requests
        if requests < self.rule.min_requests:
            return share, False
        if self.rule.kind == "error_rate":
            return share, share > self.rule.threshold
        # Over the percentile: more than (100 - p) % of the window is over the threshold.
        return share, bad * 100 > requests * (100.0 - self.rule.percentile)
