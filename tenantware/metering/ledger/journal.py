"""The balance journal: every credit and debit of a prepaid balance, append-only, in the ledger.

A balance equals the sum of its tenant's entries (``tenantware balances verify`` checks it).
Credits (top-ups, redemptions, payments, adjustments) are written when they are made; a
request's debit is written with its usage record, in the same transaction. Each entry has a
unique ``reference`` (``topup:<tenant>:<key hash>``, ``code:<hash>``,
``payment:<provider>:<event id>``, ``debit:<record id>``): whoever writes a reference first
wins and everyone after reads that entry, which makes every credit idempotent across
replicas. Nothing updates or deletes an entry (the SQL ledgers refuse it with a trigger).

Redemption codes live next to it: stored as hashes, each redeemed by at most one journal
entry (its reference is the code's hash).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol, runtime_checkable

import msgspec

from tenantware.metering.ledger.record import UsageRecord

__all__ = [
    "CODE_COLUMNS",
    "JOURNAL_COLUMNS",
    "BalanceJournal",
    "JournalEntry",
    "JournalKind",
    "RedemptionCode",
    "code_from_row",
    "code_row",
    "debit_entries",
    "entry_from_row",
    "entry_row",
]

JournalKind = Literal["topup", "redemption", "payment", "adjustment", "debit"]
#: Kinds that add to a balance (made through the admin API, a code or a payment).
CREDIT_KINDS: Final = frozenset({"topup", "redemption", "payment", "adjustment"})


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One credit (positive) or debit (negative) of a tenant's prepaid balance."""

    id: str
    tenant_id: str
    #: Unix time of the entry.
    at: float
    kind: JournalKind
    amount_nanousd: int
    #: Unique: what makes a retried credit the same credit (see the module docstring).
    reference: str
    #: SHA-256 of the request that made it: a retry with another body is refused.
    fingerprint: str = ""
    #: ``role:key id`` of whoever made it (``provider:<name>`` for a payment).
    actor: str = ""
    #: The request id of a debit, the operator's note of a credit (never a secret).
    note: str = ""


class RedemptionCode(msgspec.Struct, frozen=True, kw_only=True):
    """A single-use code worth ``amount_nanousd``, stored as a hash (the code is shown once)."""

    code_hash: str
    batch_id: str
    amount_nanousd: int
    created_at: float
    created_by: str
    #: Only this tenant may redeem it (``None``: any tenant).
    tenant_id: str | None = None
    expires_at: float | None = None


JOURNAL_COLUMNS: Final = JournalEntry.__struct_fields__
CODE_COLUMNS: Final = RedemptionCode.__struct_fields__


@runtime_checkable
class BalanceJournal(Protocol):
    """A ledger that keeps the balance journal and the redemption codes."""

    async def append(self, entry: JournalEntry) -> JournalEntry:
        """Store ``entry`` unless one with its ``reference`` exists; the stored entry (this
        one, or the one written first). ``LedgerUnavailable`` if it cannot."""
        ...

    async def entries(self, tenant_id: str, *, limit: int = 100) -> list[JournalEntry]:
        """A tenant's newest ``limit`` entries, newest first."""
        ...

    async def totals(self) -> dict[str, int]:
        """Per tenant with entries: the sum of its entries (what its balance must be)."""
        ...

    async def credit_ids(self, tenant_id: str) -> list[str]:
        """Ids of a tenant's credit entries (to restore a store's record of what it applied)."""
        ...

    async def add_codes(self, codes: Sequence[RedemptionCode]) -> None:
        """Store new codes (all or none)."""
        ...

    async def code(self, code_hash: str) -> RedemptionCode | None:
        """The code with this hash, if one was created."""
        ...


def entry_row(entry: JournalEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in JOURNAL_COLUMNS)


def entry_from_row(row: Sequence[Any]) -> JournalEntry:
    return JournalEntry(**dict(zip(JOURNAL_COLUMNS, row, strict=True)))


def code_row(code: RedemptionCode) -> tuple[Any, ...]:
    return tuple(getattr(code, name) for name in CODE_COLUMNS)


def code_from_row(row: Sequence[Any]) -> RedemptionCode:
    return RedemptionCode(**dict(zip(CODE_COLUMNS, row, strict=True)))


def debit_entries(records: Sequence[UsageRecord]) -> list[JournalEntry]:
    """The journal debits of a batch of usage records (those a prepaid balance paid)."""
    return [
        JournalEntry(
            id="debit:" + r.record_id,
            tenant_id=r.tenant,
            at=r.ts,
            kind="debit",
            amount_nanousd=-r.balance_debit_nanousd,
            reference="debit:" + r.record_id,
            actor="key:" + r.key_id,
            note=r.request_id,
        )
        for r in records
        if r.balance_debit_nanousd
    ]
