"""Rules judged from the gateway's state rather than from records: each kind has a probe.

A probe reads what the gateway already keeps (circuit states, ledger health, the quota
store's budget counters) once per evaluation, never per request. ``PROBES`` maps a kind to
its probe; another kind (a prepaid balance under its threshold) plugs in the same way with
``AlertEngine.add_probe``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from tenantware.alerts.model import Finding
from tenantware.config import AlertRule
from tenantware.quota.plan import GLOBAL_TAG, KIND_MONTHLY_SPEND, KIND_SPEND, Plan, build_plan
from tenantware.quota.store import QuotaStore
from tenantware.state import Snapshot

__all__ = [
    "CIRCUIT_FACT",
    "LEDGER_FACT",
    "STORE_FACT",
    "Probe",
    "ProbeInput",
    "circuit_probe",
    "duration_probe",
    "spend_probe",
]

#: Fact names (``facts``: fact -> unix time it has held since, earliest over replicas).
CIRCUIT_FACT: Final = "circuit:"
LEDGER_FACT: Final = "ledger"
STORE_FACT: Final = "store"
_TENANT_CIRCUIT: Final = "tenant:"


class ProbeInput:
    """What one evaluation gives every probe."""

    __slots__ = ("facts", "now", "snapshot")

    def __init__(self, snapshot: Snapshot, facts: Mapping[str, float], now: float) -> None:
        self.snapshot = snapshot
        self.facts = facts
        self.now = now


#: ``await probe(rule, given)``: one finding per group the rule watches.
Probe = Callable[[AlertRule, ProbeInput], Awaitable[list[Finding]]]


async def circuit_probe(rule: AlertRule, given: ProbeInput) -> list[Finding]:
    """Circuits out of service (open or half-open) for longer than ``threshold`` seconds:
    deployment circuits (``upstream/model``) for scope ``upstream``, tenant circuits for
    ``tenant``, both for ``global``; one alert per circuit."""
    match = set(rule.match)
    found: list[Finding] = []
    for name, since in given.facts.items():
        if not name.startswith(CIRCUIT_FACT):
            continue
        key = name[len(CIRCUIT_FACT) :]
        tenant: str | None = None
        if key.startswith(_TENANT_CIRCUIT):
            if rule.scope == "upstream":
                continue
            tenant = key[len(_TENANT_CIRCUIT) :]
            owner = tenant
        else:
            if rule.scope == "tenant":
                continue
            owner = key.partition("/")[0]
        if match and owner not in match:
            continue
        held = max(0.0, given.now - since)
        found.append(Finding(key, tenant, held, held >= rule.threshold))
    return found


def duration_probe(fact: str) -> Probe:
    """A gateway-wide state (``ledger``, ``store``) that has held ``threshold`` seconds."""

    async def probe(rule: AlertRule, given: ProbeInput) -> list[Finding]:
        since = given.facts.get(fact)
        if since is None:
            return []
        held = max(0.0, given.now - since)
        return [Finding("", None, held, held >= rule.threshold)]

    return probe


def spend_probe(store: QuotaStore) -> Probe:
    """Spend against the daily or monthly budget, as the quota layer counts it: per tenant
    with a budget (scope ``tenant``), or the gateway's global budget (scope ``global``)."""

    async def probe(rule: AlertRule, given: ProbeInput) -> list[Finding]:
        kind = KIND_SPEND if rule.budget == "daily" else KIND_MONTHLY_SPEND
        config = given.snapshot.config
        found: list[Finding] = []
        if rule.scope == "global":
            plan, _ = build_plan(config, GLOBAL_TAG, config.quota.global_limits, None, store.prefix)
            share = await _share(store, plan, kind)
            if share is not None:
                found.append(Finding("", None, share, share >= rule.threshold))
            return found
        match = set(rule.match)
        for tenant in given.snapshot.registry.tenants():
            if match and tenant.id not in match:
                continue
            plan, _ = build_plan(config, tenant.id, tenant.limits, None, store.prefix)
            share = await _share(store, plan, kind)
            if share is not None:
                found.append(Finding(tenant.id, tenant.id, share, share >= rule.threshold))
        return found

    return probe


async def _share(store: QuotaStore, plan: Plan | None, kind: str) -> float | None:
    """Share of the budget of ``kind`` in ``plan`` used so far (``None``: no such budget)."""
    if plan is None:
        return None
    index = next((i for i, limit in enumerate(plan.limits) if limit.kind == kind), None)
    if index is None:
        return None
    cap = plan.limits[index].limit
    used = (await store.usage(plan))[index]
    return used / cap if cap > 0 else 1.0


def balance_probe(store: QuotaStore) -> Probe:
    """Prepaid balances under the rule's ``threshold`` (USD), or, with 0, under each tenant's
    own ``low_balance_usd``: one alert per prepaid tenant, read from the quota store that
    reserves from them. A balance never credited is not judged."""

    async def probe(rule: AlertRule, given: ProbeInput) -> list[Finding]:
        match = set(rule.match)
        found: list[Finding] = []
        for tenant in given.snapshot.registry.tenants():
            if not tenant.prepaid or (match and tenant.id not in match):
                continue
            low = (
                tenant.low_balance_nanousd
                if rule.threshold == 0
                else round(rule.threshold * _NANOUSD_PER_USD)
            )
            if low <= 0:
                continue
            balance = await store.balance(tenant.id)
            if balance is None:
                continue
            usd = balance / _NANOUSD_PER_USD
            found.append(Finding(tenant.id, tenant.id, usd, balance < low))
        return found

    return probe


_NANOUSD_PER_USD: Final = 1_000_000_000
