"""Export and restore everything of one tenant as one versioned archive.

The archive holds the registry entry (policy, limits, data settings and API key *hashes*),
the usage records, the audit trail, the balance journal (when the ledger keeps one), the
tenant's key salt and its request logs still sealed. Logs stay encrypted in the archive;
they open again only in a deployment with the same master key, and the salt travels so they
do. Keep the archive like a database backup.

The balance journal travels whole (credits and debits, oldest first). On import its entries
are appended by their unique references (one copy, however often), and the quota store is
given the journal's sum as the balance when it holds none (``Balances.restore``, as a gateway
does at start). A store that already holds a balance for the tenant while the archive brings
journal entries the target lacks is refused: the two would disagree.

Import writes into the same or another deployment and touches nothing of other tenants.
Every step skips what is already there (records and audit entries by id, logs by id, the
registry entry when equal, the salt when equal), so importing the same archive twice leaves
one copy. A tenant that exists with *different* key material is refused (its logs would not
open), never overwritten.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal

import msgspec

from tenantware.audit import AuditEntry
from tenantware.balances import Balances
from tenantware.config import Tenant
from tenantware.logbook import LogRow, LogStore
from tenantware.metering.ledger import (
    AuditFilter,
    AuditLog,
    BalanceJournal,
    JournalEntry,
    Ledger,
    UsageRecord,
)
from tenantware.registry.store import RegistryStore

__all__ = [
    "ARCHIVE_VERSION",
    "ArchiveConflict",
    "ImportReport",
    "TenantArchive",
    "decode_archive",
    "encode_archive",
    "export_tenant",
    "import_tenant",
]

ARCHIVE_VERSION: Final = 1
_ALL: Final = 1 << 62
_LOG_PAGE: Final = 1000


class ArchiveConflict(ValueError):
    """The archive cannot be restored here without overwriting something (the message says
    what)."""


class TenantArchive(msgspec.Struct, frozen=True, kw_only=True):
    format: Literal["tenantware.tenant-archive"] = "tenantware.tenant-archive"
    version: int = ARCHIVE_VERSION
    exported_at: float
    tenant: Tenant
    usage_records: list[UsageRecord] = msgspec.field(default_factory=list)
    audit: list[AuditEntry] = msgspec.field(default_factory=list)
    #: The tenant's balance journal, oldest first (empty when the ledger keeps none).
    balance_journal: list[JournalEntry] = msgspec.field(default_factory=list)
    #: The salt the tenant's data keys are derived with (``None``: never keyed).
    key_salt: bytes | None = None
    request_logs: list[LogRow] = msgspec.field(default_factory=list)


class ImportReport(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    registry_written: bool
    usage_records: int
    audit_entries: int
    request_logs_added: int
    #: Journal entries the target did not hold yet.
    balance_entries_added: int = 0
    #: The quota store was given the journal's sum (it held no balance for the tenant).
    balance_restored: bool = False


_encoder: Final = msgspec.json.Encoder()


def encode_archive(archive: TenantArchive) -> bytes:
    return _encoder.encode(archive)


def decode_archive(data: bytes) -> TenantArchive:
    """``ArchiveConflict`` for a file that is not an archive of a version this reads."""
    try:
        head = msgspec.json.decode(data, type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise ArchiveConflict(f"not a tenant archive: {exc}") from None
    if head.get("format") != "tenantware.tenant-archive":
        raise ArchiveConflict("not a tenant archive (no tenantware.tenant-archive format)")
    if head.get("version") != ARCHIVE_VERSION:
        raise ArchiveConflict(f"archive version {head.get('version')!r} is not supported")
    try:
        return msgspec.json.decode(data, type=TenantArchive)
    except msgspec.ValidationError as exc:
        raise ArchiveConflict(f"invalid tenant archive: {exc}") from None


async def export_tenant(
    tenant_id: str, *, registry: RegistryStore, ledger: Ledger, logs: LogStore
) -> TenantArchive:
    """Everything of ``tenant_id``; ``LookupError`` when the registry has no such tenant."""
    record = await registry.get(tenant_id)
    if record is None:
        raise LookupError(f"no tenant {tenant_id!r}")
    audit: list[AuditEntry] = []
    if isinstance(ledger, AuditLog):
        audit = await ledger.query_audit(AuditFilter(tenant=tenant_id, limit=_ALL))
        audit.reverse()  # oldest first
    rows: list[LogRow] = []
    seen: set[str] = set()
    until: float | None = None
    while True:
        page = await logs.read(tenant_id, until=until, limit=_LOG_PAGE)
        for row in page:
            if row.id not in seen:
                seen.add(row.id)
                rows.append(row)
        if len(page) < _LOG_PAGE or (until is not None and page[-1].ts + 1e-9 >= until):
            break
        until = page[-1].ts + 1e-9  # ties are re-read and skipped above
    journal: list[JournalEntry] = []
    if isinstance(ledger, BalanceJournal):
        journal = await ledger.entries(tenant_id, limit=_ALL)
        journal.reverse()  # oldest first
    return TenantArchive(
        exported_at=time.time(),
        tenant=record.tenant,
        usage_records=await ledger.query(tenant=tenant_id),
        audit=audit,
        balance_journal=journal,
        key_salt=await logs.get_salt(tenant_id),
        request_logs=sorted(rows, key=lambda row: (row.ts, row.id)),
    )


async def _missing_journal(
    archive: TenantArchive, ledger: Ledger, balances: Balances | None
) -> list[JournalEntry]:
    """The archive's journal entries the target lacks; ``ArchiveConflict`` when they cannot
    be restored there without a balance disagreeing with its journal."""
    tenant_id = archive.tenant.id
    if not archive.balance_journal:
        return []
    if not isinstance(ledger, BalanceJournal):
        raise ArchiveConflict("the archive holds a balance journal and this ledger keeps none")
    held = {entry.reference for entry in await ledger.entries(tenant_id, limit=_ALL)}
    missing = [e for e in archive.balance_journal if e.reference not in held]
    if missing and balances is not None and await balances.balance(tenant_id) is not None:
        raise ArchiveConflict(
            f"tenant {tenant_id!r} has a prepaid balance here that the archive's journal "
            "would not match; delete its balance from the quota store first"
        )
    return missing


async def import_tenant(
    archive: TenantArchive,
    *,
    registry: RegistryStore,
    ledger: Ledger,
    logs: LogStore,
    balances: Balances | None = None,
) -> ImportReport:
    """Restore ``archive`` (idempotent); ``ArchiveConflict`` instead of overwriting.
    ``balances``: the target's quota store is given the restored balance (without it, each
    gateway gives it at its next start)."""
    tenant = archive.tenant
    if archive.key_salt is not None:
        current = await logs.get_salt(tenant.id)
        if current is not None and current != archive.key_salt:
            raise ArchiveConflict(
                f"tenant {tenant.id!r} exists here with other key material: its logs would "
                "not open; delete it first"
            )
    if (
        any(row.tenant != tenant.id for row in archive.request_logs)
        or any(r.tenant != tenant.id for r in archive.usage_records)
        or any(e.tenant_id != tenant.id for e in archive.balance_journal)
    ):
        raise ArchiveConflict("the archive holds rows of another tenant")
    missing = await _missing_journal(archive, ledger, balances)
    record = await registry.get(tenant.id)
    written = record is None or record.tenant != tenant
    if written:
        audit = AuditEntry(
            at=time.time(),
            actor="cli:tenant-import",
            action="tenant.update" if record else "tenant.create",
            tenant=tenant.id,
            before_version=record.version if record else 0,
        )
        await registry.put(tenant, expect=record.version if record else 0, audit=audit)
    if archive.key_salt is not None:
        await logs.create_salt(tenant.id, archive.key_salt)
    if isinstance(ledger, BalanceJournal):
        # In the journal's order, before the usage records would add their own debits.
        for journaled in archive.balance_journal:
            await ledger.append(journaled)  # one copy per reference, however often
    await ledger.write(archive.usage_records)
    if isinstance(ledger, AuditLog):
        for entry in archive.audit:
            await ledger.write_audit(entry)
    added = await logs.restore(archive.request_logs)
    restored = False
    if balances is not None and archive.balance_journal:
        restored = bool(await balances.restore([tenant.id]))
    return ImportReport(
        tenant=tenant.id,
        registry_written=written,
        usage_records=len(archive.usage_records),
        audit_entries=len(archive.audit),
        request_logs_added=added,
        balance_entries_added=len(missing),
        balance_restored=restored,
    )
