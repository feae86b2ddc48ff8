"""``tenantware alerts export-rules``: the configured rules as a Prometheus rules file.

Each rule becomes one alerting rule over the metrics the gateway exports (``/metrics``), with
the same scope (a ``by`` clause per tenant/model, a tenant or model set for a tier or an
upstream) and threshold. Where the metrics cannot say the same thing the file says how it
differs (``annotations.approximation``): Prometheus interpolates percentiles inside histogram
buckets, budgets are rolling days (30 days for a month) rather than calendar ones, and the
store failover is seen through the failure counter. A rule with no metric behind it (a
tenant's own circuit) is listed in a comment and left out.
"""

from __future__ import annotations

from typing import Any

import yaml

from tenantware.alerts.rules import ERROR_OUTCOMES, NOT_SERVED, default_summary, rules_in_force
from tenantware.config import GatewayConfig
from tenantware.quota.plan import KIND_MONTHLY_SPEND, KIND_SPEND, build_plan
from tenantware.registry.view import MemoryTenantRegistry

__all__ = ["export_rules"]

_GROUP = "tenantware"


def _regex(values: Any) -> str:
    return "|".join(sorted(str(v).replace(".", "\\\\.") for v in values))


def _selector(matchers: list[str]) -> str:
    return "{" + ",".join(matchers) + "}" if matchers else ""


class _Scope:
    """Label matchers and ``by`` labels that stand for one rule's scope."""

    def __init__(self, config: GatewayConfig, scope: str, match: list[str]) -> None:
        self.matchers: list[str] = []
        self.by: list[str] = []
        self.note = ""
        tenants = MemoryTenantRegistry(config).tenants()
        if scope == "tenant":
            self.by = ["tenant"]
            if match:
                self.matchers.append(f'tenant=~"{_regex(match)}"')
        elif scope == "model":
            self.by = ["model"]
            if match:
                self.matchers.append(f'model=~"{_regex(match)}"')
        elif scope == "tier":
            tiers = match or sorted({t.tier for t in tenants})
            members = [t.id for t in tenants if t.tier in tiers]
            self.matchers.append(f'tenant=~"{_regex(members) or "^$"}"')
            self.note = "a tier is the set of its tenants: " + ", ".join(sorted(tiers))
        elif scope == "upstream":
            upstreams = [u for u in config.upstreams if not match or u.name in match]
            models = {m for u in upstreams for m in u.models}
            self.matchers.append(f'model=~"{_regex(models) or "^$"}"')
            self.note = "an upstream is the set of models it serves (metrics have no upstream)"


def _window(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def _rule(
    name: str, expr: str, rule: Any, labels: dict[str, str], approximation: str, for_s: float = 0
) -> dict[str, Any]:
    out: dict[str, Any] = {"alert": name, "expr": expr}
    if for_s > 0:
        out["for"] = _window(for_s)
    out["labels"] = {"severity": rule.severity, "rule": rule.id, **labels}
    annotations = {"summary": default_summary(rule)}
    if approximation:
        annotations["approximation"] = approximation
    out["annotations"] = annotations
    return out


def export_rules(config: GatewayConfig) -> str:
    """The rules file (YAML) for the rules ``config`` puts in force."""
    rules: list[dict[str, Any]] = []
    left_out: list[str] = []
    for rule in rules_in_force(config.alerts):
        name = "Tenantware_" + rule.id.replace("-", "_").replace(".", "_")
        kind = rule.kind
        if kind in ("error_rate", "latency", "queue_wait"):
            scope = _Scope(config, rule.scope, rule.match)
            window = _window(rule.window_s)
            by = ", ".join(scope.by)
            if kind == "error_rate":
                errors = _regex(ERROR_OUTCOMES)
                served = _regex(NOT_SERVED)
                bad = _selector([*scope.matchers, f'outcome=~"{errors}"'])
                every = _selector([*scope.matchers, f'outcome!~"{served}"'])
                expr = (
                    f"(sum by ({by}) (rate(tenantware_requests_total{bad}[{window}]))"
                    f" / sum by ({by}) (rate(tenantware_requests_total{every}[{window}]))"
                    f") > {rule.threshold}"
                    f" and sum by ({by}) (increase(tenantware_requests_total{every}[{window}]))"
                    f" >= {rule.min_requests}"
                )
                note = scope.note
            else:
                metric = {
                    "latency": "tenantware_request_seconds",
                    "added_latency": "tenantware_added_latency_seconds",
                    "ttft": "tenantware_time_to_first_token_seconds",
                }[rule.metric]
                note = "histogram_quantile interpolates within buckets"
                matchers = scope.matchers
                if kind == "queue_wait":
                    metric = "tenantware_queue_wait_seconds"
                    if rule.scope in ("model", "upstream"):
                        # The queue wait histogram has only the tenant label.
                        matchers, by = [], ""
                        note += "; queue wait has no model label: judged gateway-wide"
                selector = _selector(matchers)
                by_le = ", ".join(["le", *([by] if by else [])])
                expr = (
                    f"histogram_quantile({rule.percentile / 100:g}, sum by ({by_le}) "
                    f"(rate({metric}_bucket{selector}[{window}]))) > {rule.threshold}"
                )
                if scope.note:
                    note += "; " + scope.note
            rules.append(_rule(name, expr, rule, {}, note))
        elif kind == "spend":
            rules.extend(_spend_rules(config, rule, name))
        elif kind == "balance":
            matchers = [f'tenant=~"{_regex(rule.match)}"'] if rule.match else []
            if rule.threshold == 0:
                expr = f"tenantware_balance_low{_selector(matchers)} == 1"
            else:
                limit = round(rule.threshold * 1_000_000_000)
                expr = f"tenantware_balance_nanousd{_selector(matchers)} < {limit}"
            note = "the balance as each gateway process last saw it"
            rules.append(_rule(name, expr, rule, {}, note))
        elif kind == "circuit_open":
            if rule.scope == "tenant":
                left_out.append(f"{rule.id}: tenant circuits have no metric")
                continue
            matchers = ['upstream!="app"']
            if rule.match:
                matchers = [f'upstream=~"{_regex(rule.match)}"']
            expr = f"tenantware_breaker_state{_selector(matchers)} > 0"
            rules.append(_rule(name, expr, rule, {}, "", for_s=rule.threshold))
        elif kind == "ledger_spilling":
            expr = f"tenantware_ledger_failing_seconds > {rule.threshold:g}"
            rules.append(_rule(name, expr, rule, {}, ""))
        elif kind == "store_failover":
            expr = "sum(increase(tenantware_store_failures_total[1m])) > 0"
            note = "seen through failure-policy decisions in the last minute"
            rules.append(_rule(name, expr, rule, {}, note, for_s=rule.threshold))
        else:
            left_out.append(f"{rule.id}: kind {kind} has no metric")
    head = "# Generated by `tenantware alerts export-rules` from the gateway's alert rules.\n"
    for line in left_out:
        head += f"# Not expressible in PromQL: {line}\n"
    body = yaml.safe_dump(
        {"groups": [{"name": _GROUP, "rules": rules}]}, sort_keys=False, width=10_000
    )
    return head + body


def _spend_rules(config: GatewayConfig, rule: Any, name: str) -> list[dict[str, Any]]:
    kind = KIND_SPEND if rule.budget == "daily" else KIND_MONTHLY_SPEND
    window = "1d" if rule.budget == "daily" else "30d"
    period = "day" if rule.budget == "daily" else "month"
    note = f"a rolling {window} rather than the budget's calendar {period}"
    out: list[dict[str, Any]] = []
    targets: list[tuple[str | None, Any]] = []
    if rule.scope == "global":
        targets.append((None, config.quota.global_limits))
    else:
        for tenant in MemoryTenantRegistry(config).tenants():
            if not rule.match or tenant.id in rule.match:
                targets.append((tenant.id, tenant.limits))
    for tenant_id, limits in targets:
        plan, _ = build_plan(config, tenant_id or "*", limits, None, "")
        cap = next((lim.limit for lim in plan.limits if lim.kind == kind), None) if plan else None
        if cap is None:
            continue
        selector = f'{{tenant="{tenant_id}"}}' if tenant_id else ""
        expr = (
            f"sum(increase(tenantware_cost_nanousd_total{selector}[{window}]))"
            f" >= {rule.threshold * cap:.0f}"
        )
        labels = {"tenant": tenant_id} if tenant_id else {}
        out.append(_rule(name, expr, rule, labels, note))
    return out
