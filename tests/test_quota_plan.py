"""Plans: tier defaults and burst allowances, per-model scopes, the local fallback's share."""

from __future__ import annotations

from tenantware.quota import build_plan
from tenantware.quota.plan import KIND_REQUESTS
from tenantware.registry import MemoryTenantRegistry
from tests.support import make_config, tenant_entries


def test_tier_burst_allowances_apply_and_a_tenant_can_override_them() -> None:
    tenants = tenant_entries()
    tenants[1]["limits"] = {"burst_multiplier": 2.5}  # hobby is on the free tier (1x)
    tenants.append({"id": "mid", "tier": "pro"})
    config = make_config(tenants=tenants)
    registry = MemoryTenantRegistry(config)
    bursts = {}
    for tenant in ("acme", "hobby", "mid"):
        view = registry.by_id(tenant)
        assert view is not None
        plan, _ = build_plan(config, tenant, view.limits, None, "")
        assert plan is not None
        rpm = next(limit for limit in plan.limits if limit.kind == KIND_REQUESTS)
        bursts[tenant] = rpm.p2 // rpm.p1
    # enterprise 6000/min x 3, free 60/min overridden to 2.5x, pro 600/min x 2.
    assert bursts == {"acme": 18_000, "hobby": 150, "mid": 1_200}


def test_per_model_limits_share_the_tenant_hash_tag_and_global_limits_have_their_own() -> None:
    config = make_config(
        quota={
            "model_limits": {"gpt-4.1": {"tokens_per_minute": 100}},
            "tenant_model_limits": {"acme": {"gpt-4.1": {"requests_per_minute": 5}}},
            "global_limits": {"requests_per_minute": 1000},
        }
    )
    registry = MemoryTenantRegistry(config)
    view = registry.by_id("acme")
    assert view is not None
    plan, global_plan = build_plan(config, "acme", view.limits, "gpt-4.1", "p:")
    assert plan is not None
    assert global_plan is not None
    assert all(key.startswith("p:tw:{acme}:") for key in plan.keys)
    assert "p:tw:{acme}:model:gpt-4.1:tpm" in plan.keys
    assert "p:tw:{acme}:model:gpt-4.1:rpm" in plan.keys
    assert global_plan.keys == ("p:tw:{*}:rpm",)
    merged, none = build_plan(config, "acme", view.limits, "gpt-4.1", "p:", merge=True)
    assert merged is not None
    assert none is None
    assert merged.keys == (*plan.keys, *global_plan.keys)
    # Headers come from the tenant's own limits only.
    assert merged.header_groups == plan.header_groups
    other, _ = build_plan(config, "acme", view.limits, "deepseek-v3.2", "p:")
    assert other is not None
    assert not any(":model:" in key for key in other.keys)


def test_the_local_fallback_divides_limits_among_replicas() -> None:
    config = make_config(
        gateway={"replicas": 4, "on_store_failure": "local"},
        quota={"on_store_failure": {"budget": "closed"}},
    )
    registry = MemoryTenantRegistry(config)
    view = registry.by_id("hobby")  # free: 60 requests/min, 40,000 tokens/min, burst 1x
    assert view is not None
    plan, _ = build_plan(config, "hobby", view.limits, None, "")
    assert plan is not None
    assert not plan.closed
    assert plan.local is not None
    requests, tokens = plan.local.limits
    assert requests.limit == 15
    assert requests.p2 // requests.p1 == 15  # burst shared too
    assert requests.p1 == 4 * 1_000_000  # one every 4 s: 15 per minute
    assert tokens.p2 == 10_000
