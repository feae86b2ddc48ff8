"""HMAC-SHA256 signatures of webhook deliveries, replay-safe with a timestamp.

The header is ``tenantware-signature: t=<unix seconds>,v1=<hex>`` where ``hex`` is
HMAC-SHA256 over ``"<t>." + body`` with the destination's secret: a receiver recomputes it,
compares in constant time and refuses a ``t`` too far from its clock, so a captured request
cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "sign", "verify_signature"]

SIGNATURE_HEADER = "tenantware-signature"


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``tenantware-signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: bytes,
    body: bytes,
    header: str,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    timestamp = int(stamps[0])
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))
