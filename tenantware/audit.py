"""The audit entry: one change made through the admin API, as the trail keeps it.

Neutral ground shared by the registry (its own short trail, written with the change) and the
ledger (the durable, append-only trail). ``before``/``after`` are the changed object with every
key hash removed (``public_value``): an entry never holds a secret.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["AuditAction", "AuditEntry", "public_value"]

AuditAction = Literal[
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "key.issue",
    "key.rotate",
    "key.revoke",
    "admin_key.issue",
    "admin_key.revoke",
    "registry.seed",
    "balance.credit",
    "balance.reconcile",
    "redemption_codes.create",
    "policy.update",
    "migration_rules.update",
    "migration_rules.delete",
    "alert_rules.update",
    "alert_rules.delete",
]


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One change: who made it, what, and the versions and values around it."""

    #: Registry version the change produced (the entry's position in the trail).
    version: int = 0
    at: float
    #: ``role:key id`` of the caller (``admin:ops``, ``tenant:key_1``).
    actor: str
    action: AuditAction
    #: The tenant changed ("" for an admin key).
    tenant: str
    #: The tenant record's version before the change (0: it did not exist).
    before_version: int
    key_id: str | None = None
    request_id: str | None = None
    address: str | None = None
    #: Unique id (``aud_...``) of an entry of the ledger's trail ("" in the registry's).
    id: str = ""
    #: The caller's role (``admin``, ``tenant``).
    role: str = ""
    #: The object before and after the change, key hashes removed (None: it did not exist).
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


def public_value(value: msgspec.Struct | None) -> dict[str, Any] | None:
    """A tenant or admin key as plain JSON values, without any key hash or sealed key."""
    if value is None:
        return None
    plain: dict[str, Any] = msgspec.to_builtins(value)
    plain.pop("hash", None)
    keys = plain.get("keys")
    if isinstance(keys, list):
        plain["keys"] = [{k: v for k, v in key.items() if k != "hash"} for key in keys]
    policy = plain.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("upstream_keys"), list):
        # A tenant's own upstream keys: which upstream and a hint, never the sealed value.
        policy["upstream_keys"] = [
            {k: v for k, v in key.items() if k != "sealed"} for key in policy["upstream_keys"]
        ]
    return plain
