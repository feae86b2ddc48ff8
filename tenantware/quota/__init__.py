"""Quota state: plans of limits, the store protocol, memory and Redis stores, failover.

``RedisQuotaStore`` (``quota/redis.py``) is imported on first use, so that importing the
package does not load the ``redis`` library.
"""

from typing import TYPE_CHECKING, Any

from tenantware.quota.failover import FailoverQuotaStore
from tenantware.quota.memory import MemoryQuotaStore
from tenantware.quota.plan import Limit, Plan, build_plan
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


def __getattr__(name: str) -> Any:
    if name == "RedisQuotaStore":
        from tenantware.quota.redis import RedisQuotaStore

        return RedisQuotaStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from tenantware.quota.redis import RedisQuotaStore
