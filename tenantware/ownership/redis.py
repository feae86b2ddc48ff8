"""Owners shared by every gateway process: one Redis string per id, expiring with its TTL."""

from __future__ import annotations

import msgspec

from tenantware.backends.redis_support import RedisClient, redis_errors
from tenantware.ownership.store import Owner

__all__ = ["RedisOwnerStore"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Owner).decode


class RedisOwnerStore:
    """``RedisOwnerStore(client, prefix=...)``: keys ``{prefix}tw:owner:{id}``; the client
    belongs to the caller (``Stores``)."""

    def __init__(self, client: RedisClient, *, prefix: str = "") -> None:
        self._redis = client
        self._prefix = f"{prefix}tw:owner:"

    async def claim(self, object_id: str, owner: Owner, ttl_s: float) -> bool:
        value = _encode(owner)
        with redis_errors():
            held = await self._redis.set(
                self._prefix + object_id, value, nx=True, px=max(1, int(ttl_s * 1000)), get=True
            )
        return held is None or held == value  # bytes: the client never decodes

    async def owner(self, object_id: str) -> Owner | None:
        with redis_errors():
            raw = await self._redis.get(self._prefix + object_id)
        if not isinstance(raw, bytes):
            return None
        try:
            return _decode(raw)
        except msgspec.DecodeError:
            return None

    async def forget(self, object_id: str) -> None:
        with redis_errors():
            await self._redis.delete(self._prefix + object_id)

    async def aclose(self) -> None:
        """The client is the caller's to close."""
