"""Per-tenant key material: the random salt each tenant's data key is derived with.

A data key is ``HKDF(master, salt=tenant salt, info=tenant id)``. The master key alone does
not give it: destroying a tenant's salt (on tenant deletion) makes every ciphertext of that
tenant unreadable, wherever copies of it remain (crypto-shredding). The salt is not secret;
it is kept with the tenant's data (the ledger database: every replica sees the same one).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["MemoryTenantKeyStore", "TenantKeyStore"]


class TenantKeyStore(Protocol):
    """Where tenant salts live."""

    async def get_salt(self, tenant: str) -> bytes | None:
        """The tenant's salt, ``None`` when it has none (never had, or shredded)."""
        ...

    async def create_salt(self, tenant: str, salt: bytes) -> bytes:
        """Store ``salt`` unless the tenant has one; the stored one (first writer wins)."""
        ...

    async def destroy_salt(self, tenant: str) -> bool:
        """Forget the tenant's salt for good; whether there was one."""
        ...


class MemoryTenantKeyStore:
    """Salts in this process (tests, single-process gateways with a memory ledger)."""

    def __init__(self) -> None:
        self.salts: dict[str, bytes] = {}

    async def get_salt(self, tenant: str) -> bytes | None:
        return self.salts.get(tenant)

    async def create_salt(self, tenant: str, salt: bytes) -> bytes:
        return self.salts.setdefault(tenant, salt)

    async def destroy_salt(self, tenant: str) -> bool:
        return self.salts.pop(tenant, None) is not None
