"""Log rows and tenant salts in the PostgreSQL ledger database, under row-level security.

Every transaction binds its tenant first (``rls.bind_tenant``): through the gateway's role a
transaction sees only that tenant's rows, whatever its query says. The tables are created
and protected here, under the ledger's advisory lock so replicas may start together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

import anyio.to_thread
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from tenantware.backends.errors import StoreUnavailable
from tenantware.logbook.sql import SqlLogStore, Work
from tenantware.metering.ledger.rls import (
    MIGRATION_LOCK,
    bind_tenant,
    create_function,
    protect,
)

__all__ = ["PostgresLogStore"]

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS {s}.tenant_keys ("
    "tenant text PRIMARY KEY, salt bytea NOT NULL, created_at double precision NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {s}.request_logs ("
    "id text NOT NULL, tenant text NOT NULL, ts double precision NOT NULL, "
    "expires_at double precision NOT NULL, key_version integer NOT NULL, "
    "size integer NOT NULL, sealed bytea NOT NULL, PRIMARY KEY (tenant, id))",
    "CREATE INDEX IF NOT EXISTS request_logs_tenant_ts ON {s}.request_logs (tenant, ts)",
    "CREATE INDEX IF NOT EXISTS request_logs_tenant_expiry "
    "ON {s}.request_logs (tenant, expires_at)",
)


class PostgresLogStore(SqlLogStore):
    """``PostgresLogStore("postgresql://...", schema="public")``."""

    def __init__(self, url: str, *, schema: str = "public", timeout_s: float = 5.0) -> None:
        self.url = url
        self.schema = schema
        self.timeout_s = timeout_s
        self._pool: ConnectionPool | None = None
        self._ready = False

    def _sql(self, text: str) -> str:
        qualified = sql.Identifier(self.schema).as_string(None)
        return (
            text.replace("?", "%s")
            .replace("FROM request_logs", f"FROM {qualified}.request_logs")
            .replace("INTO request_logs", f"INTO {qualified}.request_logs")
            .replace("UPDATE request_logs", f"UPDATE {qualified}.request_logs")
            .replace("FROM tenant_keys", f"FROM {qualified}.tenant_keys")
            .replace("INTO tenant_keys", f"INTO {qualified}.tenant_keys")
        )

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._ensure)

    def _ensure(self) -> ConnectionPool:
        if self._pool is None:
            pool = ConnectionPool(
                self.url,
                min_size=1,
                max_size=4,
                timeout=self.timeout_s,
                open=False,
                kwargs={"connect_timeout": max(1, int(self.timeout_s)), "autocommit": True},
            )
            pool.open(wait=False)
            self._pool = pool
        if not self._ready:
            with _translated(), self._pool.connection(timeout=self.timeout_s) as conn:
                self._migrate(conn)
            self._ready = True
        return self._pool

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        if self._protected(conn):
            return  # done by the owner; the gateway's role may not run DDL
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            schema = sql.Identifier(self.schema)
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            for statement in _SCHEMA:
                conn.execute(sql.SQL(statement).format(s=schema))
            create_function(conn, self.schema)
            protect(conn, self.schema, "tenant_keys")
            protect(conn, self.schema, "request_logs")

    def _protected(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether both tables exist under row-level security already."""
        found = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relrowsecurity AND oid IN "
            "(to_regclass(%s), to_regclass(%s))",
            tuple(
                sql.Identifier(self.schema, table).as_string(conn)
                for table in ("tenant_keys", "request_logs")
            ),
        ).fetchone()
        return bool(found and found[0] == 2)

    def _transaction(self, tenant: str, work: Work) -> Any:
        pool = self._ensure()
        with _translated(), pool.connection(timeout=self.timeout_s) as conn, conn.transaction():
            bind_tenant(conn, tenant)
            return work(conn)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """psycopg's errors as ``StoreUnavailable`` (the message never holds the URL)."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
