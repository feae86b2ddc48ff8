"""The log store protocol: a tenant's sealed log rows, its byte quota, retention, rotation.

Every call names one tenant (none scans across tenants): on PostgreSQL each runs with that
tenant bound for its transaction, so row-level security holds even for the store's own
queries. The store also keeps the tenant salts (``crypto.TenantKeyStore``): key material
lives with the data it protects, and goes with the tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tenantware.crypto import TenantKeyStore
from tenantware.logbook.record import LogRow

__all__ = ["LogStore", "open_log_store"]


class LogStore(TenantKeyStore, Protocol):
    async def append(self, row: LogRow, *, quota_bytes: int) -> bool:
        """Store ``row`` unless the tenant's rows would exceed ``quota_bytes`` (``False``)."""
        ...

    async def read(
        self, tenant: str, *, since: float = 0.0, until: float | None = None, limit: int = 100
    ) -> list[LogRow]:
        """The tenant's rows with ``since <= ts < until``, newest first."""
        ...

    async def used_bytes(self, tenant: str) -> int: ...

    async def purge_expired(self, tenant: str, now: float) -> int:
        """Delete the tenant's rows whose retention ended; how many."""
        ...

    async def stale(self, tenant: str, current_version: int, limit: int) -> list[LogRow]:
        """Up to ``limit`` of the tenant's rows sealed under another master key version."""
        ...

    async def reseal(self, rows: Sequence[LogRow]) -> None:
        """Replace the sealed content and key version of these rows (same ids)."""
        ...

    async def restore(self, rows: Sequence[LogRow]) -> int:
        """Insert rows kept elsewhere (an export), skipping ids already stored; how many new."""
        ...

    async def delete_tenant(self, tenant: str) -> int:
        """Delete every row of the tenant; how many."""
        ...

    async def open(self) -> None:
        """Create or migrate the tables."""
        ...

    async def aclose(self) -> None: ...


def open_log_store(url: str) -> LogStore:
    """The store beside the ledger at ``url``: ``memory://``, ``sqlite:///file.db`` or
    ``postgresql://...?schema=name``."""
    if url.startswith("memory:"):
        from tenantware.logbook.memory import MemoryLogStore

        return MemoryLogStore()
    if url.startswith("sqlite://"):
        from tenantware.logbook.sqlite import SqliteLogStore

        path = url[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise ValueError(f"log store url {url!r}: use sqlite:///file.db or sqlite:////abs.db")
        return SqliteLogStore(path[1:])
    if url.startswith(("postgresql://", "postgres://")):
        from tenantware.logbook.postgres import PostgresLogStore

        parts = urlsplit(url)
        query = parse_qsl(parts.query)
        schema = next((v for k, v in query if k == "schema"), "public")
        rest = urlencode([(k, v) for k, v in query if k != "schema"])
        return PostgresLogStore(urlunsplit(parts._replace(query=rest)), schema=schema)
    raise ValueError(f"unsupported log store url {url!r}")
