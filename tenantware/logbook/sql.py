"""The SQL of the log store, shared by SQLite and PostgreSQL (``?`` placeholders; the
PostgreSQL store rewrites them). Each public call is one transaction about one tenant."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio.to_thread

from tenantware.logbook.record import LogRow

__all__ = ["SqlLogStore"]

ROW_COLUMNS: Final = "id, tenant, ts, expires_at, key_version, size, sealed"

Work = Callable[[Any], Any]


def _row(values: Sequence[Any]) -> LogRow:
    return LogRow(
        id=values[0],
        tenant=values[1],
        ts=values[2],
        expires_at=values[3],
        key_version=values[4],
        sealed=bytes(values[6]),
    )


def _values(row: LogRow) -> tuple[Any, ...]:
    return (row.id, row.tenant, row.ts, row.expires_at, row.key_version, row.size, row.sealed)


class SqlLogStore:
    """The calls, over ``_transaction(tenant, work)`` which a backend provides: ``work`` gets
    a connection inside one transaction with ``tenant`` bound."""

    def _transaction(self, tenant: str, work: Work) -> Any:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text

    async def _call(self, tenant: str, work: Work) -> Any:
        return await anyio.to_thread.run_sync(self._transaction, tenant, work)

    # -- tenant salts ----------------------------------------------------------------------

    async def get_salt(self, tenant: str) -> bytes | None:
        query = self._sql("SELECT salt FROM tenant_keys WHERE tenant = ?")
        found = await self._call(tenant, lambda c: c.execute(query, (tenant,)).fetchone())
        return bytes(found[0]) if found else None

    async def create_salt(self, tenant: str, salt: bytes) -> bytes:
        insert = self._sql(
            "INSERT INTO tenant_keys (tenant, salt, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (tenant) DO NOTHING"
        )
        select = self._sql("SELECT salt FROM tenant_keys WHERE tenant = ?")

        def work(conn: Any) -> bytes:
            conn.execute(insert, (tenant, salt, time.time()))
            return bytes(conn.execute(select, (tenant,)).fetchone()[0])

        stored: bytes = await self._call(tenant, work)
        return stored

    async def destroy_salt(self, tenant: str) -> bool:
        query = self._sql("DELETE FROM tenant_keys WHERE tenant = ?")
        count = await self._call(tenant, lambda c: c.execute(query, (tenant,)).rowcount)
        return bool(count)

    # -- log rows ----------------------------------------------------------------------------

    async def append(self, row: LogRow, *, quota_bytes: int) -> bool:
        used = self._sql("SELECT coalesce(sum(size), 0) FROM request_logs WHERE tenant = ?")
        insert = self._sql(
            f"INSERT INTO request_logs ({ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, id) DO NOTHING"
        )

        def work(conn: Any) -> bool:
            if int(conn.execute(used, (row.tenant,)).fetchone()[0]) + row.size > quota_bytes:
                return False
            conn.execute(insert, _values(row))
            return True

        stored: bool = await self._call(row.tenant, work)
        return stored

    async def read(
        self, tenant: str, *, since: float = 0.0, until: float | None = None, limit: int = 100
    ) -> list[LogRow]:
        query = self._sql(
            f"SELECT {ROW_COLUMNS} FROM request_logs WHERE tenant = ? AND ts >= ? AND ts < ? "
            "ORDER BY ts DESC, id DESC LIMIT ?"
        )
        args = (tenant, since, until if until is not None else float("inf"), limit)
        rows = await self._call(tenant, lambda c: c.execute(query, args).fetchall())
        return [_row(r) for r in rows]

    async def used_bytes(self, tenant: str) -> int:
        query = self._sql("SELECT coalesce(sum(size), 0) FROM request_logs WHERE tenant = ?")
        found = await self._call(tenant, lambda c: c.execute(query, (tenant,)).fetchone())
        return int(found[0])

    async def purge_expired(self, tenant: str, now: float) -> int:
        query = self._sql("DELETE FROM request_logs WHERE tenant = ? AND expires_at <= ?")
        count: int = await self._call(tenant, lambda c: c.execute(query, (tenant, now)).rowcount)
        return count

    async def stale(self, tenant: str, current_version: int, limit: int) -> list[LogRow]:
        query = self._sql(
            f"SELECT {ROW_COLUMNS} FROM request_logs WHERE tenant = ? AND key_version <> ? "
            "ORDER BY id LIMIT ?"
        )
        args = (tenant, current_version, limit)
        rows = await self._call(tenant, lambda c: c.execute(query, args).fetchall())
        return [_row(r) for r in rows]

    async def reseal(self, rows: Sequence[LogRow]) -> None:
        update = self._sql(
            "UPDATE request_logs SET sealed = ?, key_version = ?, size = ? "
            "WHERE tenant = ? AND id = ?"
        )
        by_tenant: dict[str, list[LogRow]] = {}
        for row in rows:
            by_tenant.setdefault(row.tenant, []).append(row)
        for tenant, group in by_tenant.items():

            def work(conn: Any, group: list[LogRow] = group) -> None:
                for row in group:
                    conn.execute(
                        update, (row.sealed, row.key_version, row.size, row.tenant, row.id)
                    )

            await self._call(tenant, work)

    async def restore(self, rows: Sequence[LogRow]) -> int:
        insert = self._sql(
            f"INSERT INTO request_logs ({ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, id) DO NOTHING"
        )
        added = 0
        by_tenant: dict[str, list[LogRow]] = {}
        for row in rows:
            by_tenant.setdefault(row.tenant, []).append(row)
        for tenant, group in by_tenant.items():

            def work(conn: Any, group: list[LogRow] = group) -> int:
                return sum(conn.execute(insert, _values(row)).rowcount for row in group)

            added += await self._call(tenant, work)
        return added

    async def delete_tenant(self, tenant: str) -> int:
        query = self._sql("DELETE FROM request_logs WHERE tenant = ?")
        count: int = await self._call(tenant, lambda c: c.execute(query, (tenant,)).rowcount)
        return count
