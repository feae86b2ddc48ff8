"""Which tenant owns which stored upstream object (a Responses API response id).

An upstream that serves the Responses API keeps the responses it answered; the gateway relays
``GET``/``DELETE /v1/responses/{id}`` to it only for the tenant whose request created the
response. ``RedisOwnerStore`` (``ownership/redis.py``) is imported on first use.
"""

from tenantware.ownership.memory import MemoryOwnerStore
from tenantware.ownership.store import Owner, OwnerStore

__all__ = ["MemoryOwnerStore", "Owner", "OwnerStore"]
