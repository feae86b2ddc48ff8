"""Builders for the quota tests: plans from limits, a controllable clock, both stores."""

from __future__ import annotations

from typing import Any

from tenantware.backends.redis_support import RedisClient, connect_redis
from tenantware.config import Limits
from tenantware.quota import MemoryQuotaStore, Plan, QuotaStore, RedisQuotaStore, build_plan
from tests.support import make_config

#: 2026-11-23 12:00:00 UTC: far from any day or month boundary.
NOON = 1_795_435_200.0


class Clock:
    """A clock the test moves by hand (Unix seconds)."""

    def __init__(self, start: float = NOON) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def plan_for(
    prefix: str = "", tenant: str = "acme", model: str | None = None, **limits: Any
) -> Plan:
    """The tenant plan of ``Limits(**limits)`` (no tier defaults)."""
    config = make_config()
    plan, _ = build_plan(config, tenant, Limits(**limits), model, prefix)
    assert plan is not None
    return plan


def make_store(
    kind: str, clock: Clock | None, *, redis_url: str = "", prefix: str = ""
) -> tuple[QuotaStore, RedisClient | None]:
    """A store of ``kind`` ("memory" or "redis") on ``clock`` (Redis TIME when ``None``)."""
    if kind == "memory":
        return MemoryQuotaStore(prefix=prefix, clock=clock or Clock()), None
    client = connect_redis(redis_url, timeout_s=5.0)
    return RedisQuotaStore(client, prefix=prefix, clock=clock), client
