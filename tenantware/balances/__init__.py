"""Prepaid balances: idempotent credits (top-ups, redemption codes, payments) and checks.

The balance itself is a limit of the quota plan (``quota.plan.KIND_BALANCE``), reserved and
settled with every other limit in one atomic step; this package credits it, exactly once per
journal entry, and compares it with the balance journal of the ledger.
"""

from tenantware.balances.payments import (
    HmacTestProvider,
    InvalidPayment,
    PaymentEvent,
    PaymentProvider,
)
from tenantware.balances.service import (
    BalanceCheck,
    Balances,
    CodeUnusable,
    Credit,
    Reconciled,
    ReferenceTaken,
    Standing,
)

__all__ = [
    "BalanceCheck",
    "Balances",
    "CodeUnusable",
    "Credit",
    "HmacTestProvider",
    "InvalidPayment",
    "PaymentEvent",
    "PaymentProvider",
    "Reconciled",
    "ReferenceTaken",
    "Standing",
]
