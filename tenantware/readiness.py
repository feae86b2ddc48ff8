"""The gateway's own parts of ``/readyz``: is it serving, which configuration, can it reach
its stores (or does a failure policy stand in for them)?

A load balancer takes a replica out of rotation on a 503 from ``/readyz``; ``/healthz`` only
says the process answers. So a check fails only when this replica cannot serve a request
that another replica could: while it starts or drains, or when its shared store is
unreachable and every failure policy is ``closed`` (each request would be refused). A store
that is down while a ``local`` or ``open`` policy decides is reported, not failed: every
replica shares that store, and taking all of them out would turn a degraded service into
none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import anyio

from tenantware.config import (
    DEFAULT_FAILURE_POLICIES,
    FailurePolicy,
    GatewayConfig,
    LimitKind,
    failure_policy,
)

if TYPE_CHECKING:
    from tenantware.gateway import Gateway
    from tenantware.metering.routes import ReadinessCheck

__all__ = ["failure_policies", "gateway_checks"]

#: The least time a store's ``PING`` is given (a loaded host answers late, not never).
_MIN_PING_S = 0.5


def failure_policies(config: GatewayConfig) -> dict[str, FailurePolicy]:
    """What stands in for the shared store, per kind of limit and for admission."""
    kinds: tuple[LimitKind | Literal["admission"], ...] = (*DEFAULT_FAILURE_POLICIES, "admission")
    return {kind: failure_policy(config, kind) for kind in kinds}


def gateway_checks(gateway: Gateway) -> dict[str, ReadinessCheck]:
    """``/readyz`` checks of ``gateway``: lifecycle, configuration, stores."""

    async def lifecycle() -> tuple[bool, dict[str, Any]]:
        if gateway.draining:
            return False, {"status": "draining"}
        if not gateway.started:
            return False, {"status": "starting"}
        return True, {"status": "serving", "processes": gateway.processes}

    async def config() -> tuple[bool, dict[str, Any]]:
        snapshot = gateway.live.current
        return True, {
            "status": "loaded",
            "version": snapshot.version,
            "registry_version": snapshot.registry_version,
        }

    async def stores() -> tuple[bool, dict[str, Any]]:
        redis = gateway.stores.redis
        if redis is None:
            return True, {"status": "ok", "shared": False}
        settings = gateway.config.gateway
        reached = False
        with anyio.move_on_after(max(settings.redis_timeout_s, _MIN_PING_S)):
            try:
                reached = bool(await redis.ping())
            except Exception:  # any failure to answer is the evidence here
                reached = False
        if reached:
            return True, {"status": "ok", "shared": True}
        policies = failure_policies(gateway.config)
        serving = any(policy != "closed" for policy in policies.values())
        status = "unreachable_policies_in_force" if serving else "unreachable"
        return serving, {"status": status, "shared": True, "policies": policies}

    return {"gateway": lifecycle, "config": config, "stores": stores}
