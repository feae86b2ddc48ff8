"""Tenant data kept in the ledger database: encrypted request logs and tenant key material.

- ``record``: what one logged exchange holds (plaintext, sealed before it is stored) and the
  stored row;
- ``store``: the ``LogStore`` protocol (logs, quotas, retention, rotation, export) which is
  also the ``crypto.TenantKeyStore`` of the deployment; ``memory``, ``sqlite`` and
  ``postgres`` implement it (PostgreSQL with row-level security);
- ``jobs``: the retention purge and the resumable key rotation.
"""

from __future__ import annotations

from tenantware.logbook.memory import MemoryLogStore
from tenantware.logbook.record import LoggedExchange, LogRow, open_row, seal_row
from tenantware.logbook.store import LogStore, open_log_store

__all__ = [
    "LogRow",
    "LogStore",
    "LoggedExchange",
    "MemoryLogStore",
    "open_log_store",
    "open_row",
    "seal_row",
]
