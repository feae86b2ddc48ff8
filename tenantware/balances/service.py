"""Credits to prepaid balances, each exactly once, and the check that balance == journal.

Every credit is two steps: append the journal entry (its ``reference`` unique, so among
concurrent retries on any replica exactly one entry is written and every caller reads that
one), then credit the quota store with the stored entry's id (the store applies an entry id
once). A retry after a crash between the two steps finds the entry and completes the credit;
it never applies it twice. The answer is built from the stored entry, so every retry gets
the same one.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence

import msgspec

from tenantware.balances.payments import PaymentEvent
from tenantware.metering.ledger.journal import (
    BalanceJournal,
    JournalEntry,
    JournalKind,
    RedemptionCode,
)
from tenantware.quota.store import QuotaStore

__all__ = [
    "BalanceCheck",
    "Balances",
    "CodeUnusable",
    "Credit",
    "Reconciled",
    "ReferenceTaken",
    "Standing",
]

#: Redemption codes start with this (the rest is random, URL-safe).
CODE_PREFIX = "twc-"


class ReferenceTaken(Exception):
    """The reference (an ``Idempotency-Key``, an event id) was used for another credit."""

    def __init__(self, stored: JournalEntry) -> None:
        super().__init__(f"reference {stored.reference!r} is taken by entry {stored.id}")
        self.stored = stored


class CodeUnusable(Exception):
    """A redemption code that does not exist, has expired, is someone else's, or was used."""


class Credit(msgspec.Struct, frozen=True, kw_only=True):
    """A credit as stored; ``replayed``: an earlier call wrote it, this one only read it."""

    entry: JournalEntry
    replayed: bool
    #: The balance right after this call (changes with later requests; not part of replays'
    #: sameness).
    balance_nanousd: int


class BalanceCheck(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's balance in the store against its journal's sum."""

    tenant_id: str
    journal_nanousd: int
    #: ``None``: the store holds no balance for it.
    store_nanousd: int | None

    @property
    def ok(self) -> bool:
        """Equal (a balance never credited is 0 on both sides)."""
        return (self.store_nanousd or 0) == self.journal_nanousd


class Reconciled(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant's store balance set back to its journal's sum (``Balances.reconcile``)."""

    tenant_id: str
    journal_nanousd: int
    #: The store's balance before and after (``None``: it held none).
    before_nanousd: int | None
    after_nanousd: int | None
    #: What the repair added to the store (negative: took out); 0 when they agreed.
    correction_nanousd: int
    #: The store's credit id of the correction (``None``: a restore, or nothing to do).
    entry_id: str | None = None


class Standing(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's balance against its low-balance threshold (what an alert looks at)."""

    tenant_id: str
    #: ``None``: never credited.
    balance_nanousd: int | None
    #: 0: no threshold.
    low_nanousd: int

    @property
    def low(self) -> bool:
        return (self.balance_nanousd or 0) < self.low_nanousd


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_hash(code: str) -> str:
    """What is stored of a code (codes are long random strings: a plain hash suffices)."""
    return "sha256:" + hashlib.sha256(code.encode()).hexdigest()


class Balances:
    """``Balances(store, journal)``: the quota store holding balances and the ledger's
    journal; one per gateway process."""

    def __init__(self, store: QuotaStore, journal: BalanceJournal) -> None:
        self.store = store
        self.journal = journal

    async def balance(self, tenant_id: str) -> int | None:
        """A tenant's balance in nano-USD (``None``: never credited)."""
        return await self.store.balance(tenant_id)

    async def standing(self, tenant_id: str, low_nanousd: int) -> Standing:
        """The balance and whether it is below ``low_nanousd`` (``TenantView.prepaid`` and
        ``TenantView.low_balance_nanousd`` say which tenants have one and their threshold)."""
        balance = await self.store.balance(tenant_id)
        return Standing(tenant_id=tenant_id, balance_nanousd=balance, low_nanousd=low_nanousd)

    async def credit(
        self,
        *,
        tenant_id: str,
        kind: JournalKind,
        amount_nanousd: int,
        reference: str,
        fingerprint: str,
        actor: str,
        note: str = "",
        low_nanousd: int = 0,
    ) -> Credit:
        """Credit once per ``reference``; ``ReferenceTaken`` when it was used for another
        tenant or another body (``fingerprint``)."""
        if amount_nanousd <= 0:
            raise ValueError("a credit must be positive")
        entry = JournalEntry(
            id=f"bal_{secrets.token_hex(12)}",
            tenant_id=tenant_id,
            at=time.time(),
            kind=kind,
            amount_nanousd=amount_nanousd,
            reference=reference,
            fingerprint=fingerprint,
            actor=actor,
            note=note,
        )
        stored = await self.journal.append(entry)
        if stored.tenant_id != tenant_id or stored.fingerprint != fingerprint:
            raise ReferenceTaken(stored)
        balance = await self.store.credit(tenant_id, stored.id, stored.amount_nanousd, low_nanousd)
        return Credit(entry=stored, replayed=stored.id != entry.id, balance_nanousd=balance)

    async def topup(
        self,
        tenant_id: str,
        amount_nanousd: int,
        *,
        idempotency_key: str,
        body: bytes,
        actor: str,
        note: str = "",
        low_nanousd: int = 0,
    ) -> Credit:
        """A top-up; the same ``idempotency_key`` with the same ``body`` credits once."""
        key_hash = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return await self.credit(
            tenant_id=tenant_id,
            kind="topup",
            amount_nanousd=amount_nanousd,
            reference=f"topup:{tenant_id}:{key_hash}",
            fingerprint=fingerprint(body),
            actor=actor,
            note=note,
            low_nanousd=low_nanousd,
        )

    async def create_codes(
        self,
        count: int,
        amount_nanousd: int,
        *,
        actor: str,
        tenant_id: str | None = None,
        expires_at: float | None = None,
    ) -> tuple[str, list[str]]:
        """``count`` new single-use codes (``(batch id, codes)``); only hashes are stored."""
        batch = f"batch_{secrets.token_hex(8)}"
        now = time.time()
        codes = [CODE_PREFIX + secrets.token_urlsafe(18) for _ in range(count)]
        await self.journal.add_codes(
            [
                RedemptionCode(
                    code_hash=code_hash(code),
                    batch_id=batch,
                    amount_nanousd=amount_nanousd,
                    created_at=now,
                    created_by=actor,
                    tenant_id=tenant_id,
                    expires_at=expires_at,
                )
                for code in codes
            ]
        )
        return batch, codes

    async def redeem(
        self, tenant_id: str, code: str, *, actor: str, low_nanousd: int = 0
    ) -> Credit:
        """Credit a code's value to ``tenant_id``: once, whoever tries concurrently; the
        same tenant retrying gets the same answer, any other ``CodeUnusable``."""
        hashed = code_hash(code)
        found = await self.journal.code(hashed)
        if found is None or (found.tenant_id is not None and found.tenant_id != tenant_id):
            raise CodeUnusable("No such redemption code.")
        if found.expires_at is not None and found.expires_at <= time.time():
            raise CodeUnusable("This redemption code has expired.")
        try:
            return await self.credit(
                tenant_id=tenant_id,
                kind="redemption",
                amount_nanousd=found.amount_nanousd,
                reference="code:" + hashed,
                fingerprint=found.batch_id,
                actor=actor,
                note=found.batch_id,
                low_nanousd=low_nanousd,
            )
        except ReferenceTaken:
            raise CodeUnusable("This redemption code was already redeemed.") from None

    async def pay(self, event: PaymentEvent, *, low_nanousd: int = 0) -> Credit:
        """Credit a verified payment once per provider event id."""
        body = f"{event.tenant_id}:{event.amount_nanousd}".encode()
        return await self.credit(
            tenant_id=event.tenant_id,
            kind="payment",
            amount_nanousd=event.amount_nanousd,
            reference=f"payment:{event.provider}:{event.event_id}",
            fingerprint=fingerprint(body),
            actor=f"provider:{event.provider}",
            note=event.event_id,
            low_nanousd=low_nanousd,
        )

    async def verify(self, tenant_ids: Iterable[str] = ()) -> list[BalanceCheck]:
        """Each tenant with journal entries (and each of ``tenant_ids``): its store balance
        against its journal's sum. Exact when no request is in flight and the ledger writer
        has flushed (a reservation is in the store before its debit is in the journal)."""
        totals = await self.journal.totals()
        out: list[BalanceCheck] = []
        for tenant_id in sorted(set(totals) | set(tenant_ids)):
            out.append(
                BalanceCheck(
                    tenant_id=tenant_id,
                    journal_nanousd=totals.get(tenant_id, 0),
                    store_nanousd=await self.store.balance(tenant_id),
                )
            )
        return out

    async def restore(self, tenant_ids: Sequence[str] | None = None) -> list[str]:
        """Give the store each journaled balance it does not hold (a new process on the
        memory store, a Redis that lost its data); the tenants restored."""
        totals = await self.journal.totals()
        restored: list[str] = []
        for tenant_id in sorted(totals if tenant_ids is None else tenant_ids):
            if tenant_id not in totals:
                continue
            credited = await self.journal.credit_ids(tenant_id)
            if await self.store.restore(tenant_id, totals[tenant_id], credited):
                restored.append(tenant_id)
        return restored

    async def reconcile(self, tenant_id: str, *, low_nanousd: int = 0) -> Reconciled:
        """Set the store's balance of ``tenant_id`` to its journal's sum, the operator's
        repair when ``verify`` shows a difference (a credit journaled whose store write
        failed, a reservation given up on that Redis still ran, a settle that recreated a
        flushed balance so that ``restore`` no longer applies).

        A store holding no balance gets it restored whole. Otherwise every journaled credit
        is first marked applied in the store (a zero credit: a store that lost them with a
        flush would apply a retried credit twice), then the difference goes in as one store
        credit (negative when the store is above) whose id is derived from the values
        compared: concurrent or retried repairs of the same difference apply once, and one
        finding them equal changes nothing. Exact only while no request or credit of the
        tenant is in flight and the ledger writer has flushed, as ``verify`` is: a
        reservation or a debit not yet journaled would be "repaired" too.
        """
        credited = await self.journal.credit_ids(tenant_id)
        journal = (await self.journal.totals()).get(tenant_id, 0)
        missing = await self.store.balance(tenant_id) is None
        if (
            missing
            and (journal or credited)
            and await self.store.restore(tenant_id, journal, credited)
        ):
            return Reconciled(
                tenant_id=tenant_id,
                journal_nanousd=journal,
                before_nanousd=None,
                after_nanousd=await self.store.balance(tenant_id),
                correction_nanousd=journal,
            )
        for entry_id in credited:
            await self.store.credit(tenant_id, entry_id, 0, low_nanousd)
        before = await self.store.balance(tenant_id)
        correction = journal - (before or 0)
        if correction == 0:
            return Reconciled(
                tenant_id=tenant_id,
                journal_nanousd=journal,
                before_nanousd=before,
                after_nanousd=before,
                correction_nanousd=0,
            )
        newest = await self.journal.entries(tenant_id, limit=1)
        basis = f"{tenant_id}:{journal}:{before}:{newest[0].id if newest else ''}"
        entry_id = "reconcile_" + hashlib.sha256(basis.encode()).hexdigest()[:24]
        after = await self.store.credit(tenant_id, entry_id, correction, low_nanousd)
        return Reconciled(
            tenant_id=tenant_id,
            journal_nanousd=journal,
            before_nanousd=before,
            after_nanousd=after,
            correction_nanousd=correction,
            entry_id=entry_id,
        )
