"""One logged exchange: the request and the answer as the client sent and got them, sealed
with the tenant's data key into a ``LogRow`` (the only form that is stored)."""

from __future__ import annotations

from typing import Final

import msgspec

from tenantware.crypto import TenantKeys

__all__ = ["LogRow", "LoggedExchange", "open_row", "seal_row"]


class LoggedExchange(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    ts: float
    path: str
    model: str
    status: int
    outcome: str
    request: bytes
    response: bytes
    #: The answer was longer than what is kept of it.
    truncated: bool = False


class LogRow(msgspec.Struct, frozen=True, kw_only=True):
    """A stored log entry: metadata in clear (for retention and listing), content sealed."""

    id: str
    tenant: str
    ts: float
    expires_at: float
    #: Master key version the content is sealed under (rotation re-seals older ones).
    key_version: int
    sealed: bytes

    @property
    def size(self) -> int:
        """Bytes the row counts against the tenant's log quota."""
        return len(self.sealed)


_encode: Final = msgspec.msgpack.Encoder().encode
_decode: Final = msgspec.msgpack.Decoder(LoggedExchange).decode


def seal_row(
    keys: TenantKeys, exchange: LoggedExchange, *, row_id: str, retention_s: float
) -> LogRow:
    """The row of ``exchange`` sealed for the tenant of ``keys``."""
    return LogRow(
        id=row_id,
        tenant=keys.tenant,
        ts=exchange.ts,
        expires_at=exchange.ts + retention_s,
        key_version=keys.current,
        sealed=keys.seal(_encode(exchange)),
    )


def open_row(keys: TenantKeys, row: LogRow) -> LoggedExchange:
    """The exchange of a row (``crypto.Undecryptable`` unless ``keys`` are its tenant's)."""
    return _decode(keys.open(row.sealed))
