"""The usage record: one per request that reached an API route, written to every ledger.

Money is in integer nano-dollars (``cost_nanousd`` at list price, ``charged_nanousd`` after the
tenant's markup or discount), so sums over millions of records stay exact. Secrets never
appear here: the API key is identified by its configured id only.
"""

from __future__ import annotations

import msgspec

__all__ = ["COLUMNS", "UsageRecord", "decode_record", "encode_record"]


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What one request used and cost. ``record_id`` is unique per gateway request and is
    the ledger's idempotency key (a client may reuse its ``x-request-id``)."""

    record_id: str
    request_id: str
    #: Unix time (seconds) the request arrived.
    ts: float
    tenant: str
    cost_center: str = ""
    key_id: str = ""
    model_requested: str = ""
    model_served: str = ""
    upstream: str = ""
    status: int = 0
    outcome: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nanousd: int = 0
    charged_nanousd: int = 0
    queue_wait_s: float = 0.0
    upstream_latency_s: float | None = None
    latency_s: float = 0.0
    #: Time to the first streamed byte; ``None`` for JSON answers.
    ttft_s: float | None = None
    stream: bool = False
    #: Tokens counted by the gateway because the upstream reported none (a cut stream, a
    #: 200 without usage) or reported unusable numbers.
    estimated: bool = False
    #: The upstream's usage was out of range (negative, more than the request could produce,
    #: not a number) and was clamped or replaced by the estimate.
    usage_invalid: bool = False
    #: What the tenant's prepaid balance paid for this request (journaled as its debit).
    balance_debit_nanousd: int = 0
    #: The call used the tenant's own upstream key: metered, not charged (``charged`` 0).
    own_upstream_key: bool = False


#: Column order shared by the SQL ledgers and the CSV export.
COLUMNS: tuple[str, ...] = UsageRecord.__struct_fields__

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode_record(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> UsageRecord:
    return _decoder.decode(data)
