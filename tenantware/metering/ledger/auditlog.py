"""The ledger's audit trail: admin changes stored append-only next to the usage records.

A ledger that keeps it offers exactly two calls, insert and query: nothing updates or deletes
an entry. An entry written twice (same ``id``) is stored once, like a usage record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

from tenantware.audit import AuditEntry

__all__ = ["AUDIT_COLUMNS", "AuditFilter", "AuditLog", "audit_row", "entry_from_row"]

#: Columns of the ``audit_log`` table, in order; ``before``/``after`` hold JSON.
AUDIT_COLUMNS: Final = (
    "id",
    "at",
    "version",
    "request_id",
    "actor",
    "role",
    "action",
    "tenant",
    "key_id",
    "before_version",
    "before",
    "after",
    "address",
)
_JSON_COLUMNS: Final = frozenset({"before", "after"})
_ROLES: Final = ("admin", "read-only", "tenant")


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /admin/audit`` asks for; ``None`` means any."""

    action: str | None = None
    tenant: str | None = None
    #: ``role:id`` or a bare key id (matches that id in any role).
    actor: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100

    def conditions(self) -> list[tuple[str, str, Any]]:
        """``(column, operator, value)`` for each field set, for a SQL ``WHERE``."""
        return [
            (column, op, value)
            for column, op, value in (
                ("action", "=", self.action),
                ("tenant", "=", self.tenant),
                ("at", ">=", self.since),
                ("at", "<", self.until),
            )
            if value is not None
        ]

    def actors(self) -> list[str]:
        """The stored ``actor`` values this filter matches."""
        if self.actor is None:
            return []
        if ":" in self.actor:
            return [self.actor]
        return [self.actor, *(f"{role}:{self.actor}" for role in _ROLES)]

    def matches(self, entry: AuditEntry) -> bool:
        return (
            (self.action is None or entry.action == self.action)
            and (self.tenant is None or entry.tenant == self.tenant)
            and (self.actor is None or entry.actor in self.actors())
            and (self.since is None or entry.at >= self.since)
            and (self.until is None or entry.at < self.until)
        )


@runtime_checkable
class AuditLog(Protocol):
    """A ledger that also keeps the audit trail."""

    async def write_audit(self, entry: AuditEntry) -> None:
        """Store ``entry`` (once, whatever the retries); ``LedgerUnavailable`` if it cannot."""

    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        """Entries matching ``wanted``, newest first, at most ``wanted.limit``."""
        ...


def audit_row(entry: AuditEntry) -> tuple[Any, ...]:
    """The entry's column values (JSON columns encoded as text)."""
    return tuple(
        (None if (v := getattr(entry, c)) is None else msgspec.json.encode(v).decode())
        if c in _JSON_COLUMNS
        else getattr(entry, c)
        for c in AUDIT_COLUMNS
    )


def entry_from_row(row: Sequence[Any]) -> AuditEntry:
    values = dict(zip(AUDIT_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        if isinstance(values[name], str | bytes):
            values[name] = msgspec.json.decode(values[name])
    return msgspec.convert(values, AuditEntry)
