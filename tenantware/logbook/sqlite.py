"""Log rows and tenant salts in the SQLite ledger file (tables of their own beside it)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Final

import anyio.to_thread

from tenantware.backends.errors import StoreUnavailable
from tenantware.logbook.sql import SqlLogStore, Work

__all__ = ["SqliteLogStore"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS tenant_keys (
    tenant TEXT PRIMARY KEY, salt BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS request_logs (
    id TEXT NOT NULL, tenant TEXT NOT NULL, ts REAL NOT NULL, expires_at REAL NOT NULL,
    key_version INTEGER NOT NULL, size INTEGER NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (tenant, id));
CREATE INDEX IF NOT EXISTS request_logs_tenant_ts ON request_logs (tenant, ts);
CREATE INDEX IF NOT EXISTS request_logs_tenant_expiry ON request_logs (tenant, expires_at);
"""


class SqliteLogStore(SqlLogStore):
    """``SqliteLogStore("tenantware-ledger.db")``: one connection, one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._transaction, "", lambda conn: None)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def _transaction(self, tenant: str, work: Work) -> Any:
        with self._lock:
            try:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc

    async def aclose(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
