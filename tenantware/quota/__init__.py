"""Quota state: plans of limits, the store protocol, memory and Redis stores, failover."""

from tenantware.quota.failover import FailoverQuotaStore
from tenantware.quota.memory import MemoryQuotaStore
from tenantware.quota.plan import Limit, Plan, build_plan
from tenantware.quota.redis import RedisQuotaStore
from tenantware.quota.store import Decision, QuotaStore

__all__ = [
    "Decision",
    "FailoverQuotaStore",
    "Limit",
    "MemoryQuotaStore",
    "Plan",
    "QuotaStore",
    "RedisQuotaStore",
    "build_plan",
]
