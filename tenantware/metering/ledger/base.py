"""The ledger protocol: durable, idempotent storage of usage records.

Every implementation is written by one background writer in batches (never on the request
path) and must accept the same record twice without storing it twice (``record_id``), so a
batch whose acknowledgement was lost can simply be written again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tenantware.audit import AuditEntry
from tenantware.metering.ledger.auditlog import AuditFilter
from tenantware.metering.ledger.journal import (
    CREDIT_KINDS,
    JournalEntry,
    RedemptionCode,
    debit_entries,
)
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.ledger.tally import ReportQuery, Tally, coarsen, tally_records

__all__ = ["Ledger", "LedgerRejected", "LedgerUnavailable", "MemoryLedger"]


class LedgerUnavailable(RuntimeError):
    """The ledger could not take a write now (database down, timeout); retry later."""


class LedgerRejected(ValueError):
    """The ledger refused the records themselves (a value out of its range, a constraint):
    retrying cannot help, so the writer isolates the culprits and sets them aside."""


@runtime_checkable
class Ledger(Protocol):
    """Where usage records live."""

    async def open(self) -> None:
        """Create or migrate the schema; may raise ``LedgerUnavailable``."""

    async def write(self, records: Sequence[UsageRecord]) -> None:
        """Store ``records`` atomically; records already stored are skipped (idempotent).

        Raises ``LedgerUnavailable`` when the ledger cannot take a write now and
        ``LedgerRejected`` when it never will take these records."""

    async def query(
        self, *, tenant: str | None = None, since: float = 0.0, until: float | None = None
    ) -> list[UsageRecord]:
        """Records of ``tenant`` (every tenant when ``None``) with ``since <= ts < until``."""
        ...

    async def tally(self, query: ReportQuery) -> list[Tally]:
        """The report's figures per (tenant, period, group), computed by the ledger (in SQL
        for the SQL ledgers), equal to ``coarsen(tally_records(records, query), query)`` over
        the same records (percentiles bucketed over an hour or more, see ``tally``)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""


class MemoryLedger:
    """In-process ledger for tests and benchmarks: nothing survives the process."""

    def __init__(self) -> None:
        self.records: dict[str, UsageRecord] = {}
        self.audit: dict[str, AuditEntry] = {}
        self.writes = 0
        #: The balance journal by reference, in order of writing.
        self.journal: dict[str, JournalEntry] = {}
        self.codes: dict[str, RedemptionCode] = {}

    async def open(self) -> None:
        return None

    async def write(self, records: Sequence[UsageRecord]) -> None:
        self.writes += 1
        for record in records:
            self.records.setdefault(record.record_id, record)
        for entry in debit_entries(records):
            self.journal.setdefault(entry.reference, entry)

    async def append(self, entry: JournalEntry) -> JournalEntry:
        return self.journal.setdefault(entry.reference, entry)

    async def entries(self, tenant_id: str, *, limit: int = 100) -> list[JournalEntry]:
        found = [e for e in self.journal.values() if e.tenant_id == tenant_id]
        return found[::-1][:limit]

    async def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.journal.values():
            out[entry.tenant_id] = out.get(entry.tenant_id, 0) + entry.amount_nanousd
        return out

    async def credit_ids(self, tenant_id: str) -> list[str]:
        return [
            e.id
            for e in self.journal.values()
            if e.tenant_id == tenant_id and e.kind in CREDIT_KINDS
        ]

    async def add_codes(self, codes: Sequence[RedemptionCode]) -> None:
        if any(c.code_hash in self.codes for c in codes):
            raise LedgerRejected("a redemption code exists already")
        for code in codes:
            self.codes[code.code_hash] = code

    async def code(self, code_hash: str) -> RedemptionCode | None:
        return self.codes.get(code_hash)

    async def query(
        self, *, tenant: str | None = None, since: float = 0.0, until: float | None = None
    ) -> list[UsageRecord]:
        end = float("inf") if until is None else until
        return sorted(
            (
                r
                for r in self.records.values()
                if (tenant is None or r.tenant == tenant) and since <= r.ts < end
            ),
            key=lambda r: r.ts,
        )

    async def tally(self, query: ReportQuery) -> list[Tally]:
        return coarsen(tally_records(self.records.values(), query), query)

    async def write_audit(self, entry: AuditEntry) -> None:
        self.audit.setdefault(entry.id, entry)

    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        found = [e for e in self.audit.values() if wanted.matches(e)]
        found.sort(key=lambda e: (e.at, e.version), reverse=True)
        return found[: wanted.limit]

    async def aclose(self) -> None:
        return None
