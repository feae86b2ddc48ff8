"""Owners kept in this process: a dict in claim order, so the oldest expire from its front."""

from __future__ import annotations

import time
from collections.abc import Callable

from tenantware.ownership.store import Owner

__all__ = ["MemoryOwnerStore"]


class MemoryOwnerStore:
    """``MemoryOwnerStore(max_entries=...)``: past the bound the oldest claims are dropped
    (their responses then answer 404, as after their TTL)."""

    def __init__(
        self, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._owners: dict[str, tuple[float, Owner]] = {}

    def _purge(self, now: float) -> None:
        owners = self._owners
        while owners:
            oldest = next(iter(owners))
            expires, _owner = owners[oldest]
            if expires > now and len(owners) <= self.max_entries:
                return
            del owners[oldest]

    async def claim(self, object_id: str, owner: Owner, ttl_s: float) -> bool:
        now = self._clock()
        self._purge(now)
        held = self._owners.get(object_id)
        if held is not None and held[0] > now:
            return held[1] == owner
        # Re-inserted at the end: claims stay in expiry order (every TTL is the same setting;
        # a shorter one after a reload only keeps an entry a little longer than asked).
        self._owners.pop(object_id, None)
        self._owners[object_id] = (now + ttl_s, owner)
        self._purge(now)
        return True

    async def owner(self, object_id: str) -> Owner | None:
        held = self._owners.get(object_id)
        if held is None or held[0] <= self._clock():
            return None
        return held[1]

    async def forget(self, object_id: str) -> None:
        self._owners.pop(object_id, None)

    async def aclose(self) -> None:
        self._owners.clear()
