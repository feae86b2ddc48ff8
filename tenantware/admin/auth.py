"""Who calls the admin API: an admin key (``admin`` or ``read-only``) or a tenant's own key.

Admin keys are not tenant keys. They come from ``gateway.admin_keys``,
``metering.admin_key_hash`` (admin role) and the variable ``gateway.admin_key_env`` names
(admin role, the bootstrap key); a tenant key (from the snapshot, so a revoked key is refused
here as on the API routes) gives the ``tenant`` role: its own tenant only.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from tenantware.state import LiveConfig, Snapshot
from tenantware.types import Scope

__all__ = ["AdminAuth", "Caller", "Role", "bearer"]

Role = Literal["admin", "read-only", "tenant"]


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    role: Role
    #: The key id (recorded in the audit trail as who made a change).
    id: str
    #: For the ``tenant`` role: the only tenant it may see.
    tenant: str | None = None


class _AdminTable:
    """Admin key hashes of one snapshot (rebuilt when the snapshot changes)."""

    __slots__ = ("by_hash", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        settings = snapshot.config.gateway
        self.by_hash: dict[str, Caller] = {}
        if snapshot.config.metering.admin_key_hash:
            self.by_hash[snapshot.config.metering.admin_key_hash] = Caller(
                role="admin", id="metering-admin"
            )
        for key in settings.admin_keys:
            self.by_hash[key.hash] = Caller(role=key.role, id=key.id)
        plain = os.environ.get(settings.admin_key_env) if settings.admin_key_env else None
        if plain:
            self.by_hash[snapshot.hasher.hash(plain)] = Caller(role="admin", id="env-admin")


def bearer(scope: Scope) -> bytes | None:
    """The presented key (``Authorization: Bearer``, ``x-api-key`` or ``api-key``)."""
    token = None
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip() or None
        if name in (b"x-api-key", b"api-key"):
            token = token or value.strip()
    return token or None


class AdminAuth:
    """``AdminAuth(live).identify(scope)``: the caller, or ``None`` (no key, unknown or
    revoked); the admin key table is rebuilt only when the snapshot changes."""

    def __init__(self, live: LiveConfig) -> None:
        self.live = live
        self._table = _AdminTable(live.current)

    def identify(self, scope: Scope) -> Caller | None:
        token = bearer(scope)
        if token is None:
            return None
        table = self._table
        if table.snapshot is not self.live.current:
            table = self._table = _AdminTable(self.live.current)
        key_hash = table.snapshot.hasher.hash(token)
        caller = table.by_hash.get(key_hash)
        if caller is not None:
            return caller
        entry = table.snapshot.registry.by_key_hash(key_hash)
        if entry is None:
            return None
        return Caller(role="tenant", id=entry.key_id, tenant=entry.tenant.id)
