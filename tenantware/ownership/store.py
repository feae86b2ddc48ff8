"""The ``OwnerStore`` protocol (``memory.py``, ``redis.py``): response id -> owning tenant."""

from __future__ import annotations

from typing import Protocol

import msgspec

__all__ = ["Owner", "OwnerStore"]


class Owner(msgspec.Struct, frozen=True, array_like=True):
    """Who created a stored response, and which upstream keeps it."""

    tenant: str
    upstream: str


class OwnerStore(Protocol):
    """Owners by response id, each forgotten ``ttl_s`` after it was claimed."""

    async def claim(self, object_id: str, owner: Owner, ttl_s: float) -> bool:
        """Record ``owner`` unless the id already has one (``False``: an upstream reused an
        id another request claimed; the first owner keeps it)."""
        ...

    async def owner(self, object_id: str) -> Owner | None: ...

    async def forget(self, object_id: str) -> None: ...

    async def aclose(self) -> None: ...
