"""The tenant-scoped response cache: opt-in per tenant and model, exact match, TTL, quotas.

- ``key``: the canonical form of a request (what makes two requests "the same") and its
  tenant-keyed digest;
- ``entry``: what is kept of an answer (sealed with the tenant's key before it is stored);
- ``store``: the ``CacheStore`` protocol; ``memory`` and ``redis`` implement it.

Entries are kept per tenant, under a digest keyed with the tenant's own key, and each
tenant's bytes are bounded by its quota: one tenant's entries never evict another's.
"""

from __future__ import annotations

from tenantware.cache.entry import CachedAnswer, decode_answer, encode_answer
from tenantware.cache.key import cache_key, canonical_request
from tenantware.cache.memory import MemoryCacheStore
from tenantware.cache.store import CacheStore, open_cache

__all__ = [
    "CacheStore",
    "CachedAnswer",
    "MemoryCacheStore",
    "cache_key",
    "canonical_request",
    "decode_answer",
    "encode_answer",
    "open_cache",
]
