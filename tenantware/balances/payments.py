"""The payment hook: a provider's webhook verified, mapped to a tenant and amount, credited once.

A provider implements ``PaymentProvider``: check the signature of the raw body, decode the
event, and say which tenant paid how much. The balance service credits it with the reference
``payment:<provider>:<event id>``, so an event delivered again (providers retry until they
see a 2xx) credits nothing more. ``HmacTestProvider`` is the test implementation: events
signed with HMAC-SHA256 over ``<timestamp>.<body>`` (the scheme Stripe-like providers use);
no real provider is contacted anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Final, Protocol

import msgspec

from tenantware.metering.pricing import usd_to_nanousd

__all__ = ["HmacTestProvider", "InvalidPayment", "PaymentEvent", "PaymentProvider"]


class InvalidPayment(ValueError):
    """A webhook that is not a valid, signed, fresh payment event (the message says why)."""


class PaymentEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A payment a provider confirmed: ``amount_nanousd`` credited to ``tenant_id`` once."""

    provider: str
    event_id: str
    tenant_id: str
    amount_nanousd: int


class PaymentProvider(Protocol):
    """One payment provider's webhook."""

    #: The name in ``/admin/payments/{name}`` and in journal references.
    name: str

    def verify(self, headers: Mapping[str, str], body: bytes) -> PaymentEvent | None:
        """The payment in a delivered event; ``None`` for an event that is no payment (to be
        acknowledged and ignored). Raises ``InvalidPayment`` for a bad signature or body."""
        ...


class _TestEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    type: str
    tenant: str
    amount_usd: Decimal


SIGNATURE_HEADER: Final = "tw-signature"
_decode = msgspec.json.Decoder(_TestEvent).decode


class HmacTestProvider:
    """``HmacTestProvider(secret)``: events ``{"id", "type": "payment.succeeded", "tenant",
    "amount_usd"}`` with the header ``tw-signature: t=<unix time>,v1=<hex HMAC-SHA256 of
    "<t>.<body>">``; older than ``tolerance_s``: refused (a captured event replayed later)."""

    def __init__(self, secret: bytes, *, name: str = "test", tolerance_s: float = 300.0) -> None:
        if not secret:
            raise ValueError("the payment webhook secret is empty")
        self.name = name
        self._secret = secret
        self.tolerance_s = tolerance_s

    def sign(self, body: bytes, at: float | None = None) -> str:
        """The signature header value a provider would send with ``body``."""
        stamp = str(int(time.time() if at is None else at))
        mac = hmac.new(self._secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return f"t={stamp},v1={mac}"

    def verify(self, headers: Mapping[str, str], body: bytes) -> PaymentEvent | None:
        header = headers.get(SIGNATURE_HEADER, "")
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        stamp, given = parts.get("t", ""), parts.get("v1", "")
        if not stamp.isdigit() or not given:
            raise InvalidPayment(f"missing or malformed {SIGNATURE_HEADER} header")
        mac = hmac.new(self._secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, given):
            raise InvalidPayment("the signature does not match")
        if abs(time.time() - int(stamp)) > self.tolerance_s:
            raise InvalidPayment("the event is too old (timestamp outside the tolerance)")
        try:
            event = _decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidPayment(f"unreadable event: {exc}") from None
        if event.type != "payment.succeeded":
            return None
        if not event.amount_usd.is_finite() or event.amount_usd <= 0:
            raise InvalidPayment("amount_usd must be a positive amount")
        return PaymentEvent(
            provider=self.name,
            event_id=event.id,
            tenant_id=event.tenant,
            amount_nanousd=usd_to_nanousd(event.amount_usd),
        )
