"""The shared ledger for many gateway processes and hosts: PostgreSQL through psycopg 3.

Batches go in as one ``INSERT ... SELECT FROM unnest(...)`` (one round trip per batch, one
array per column) with ``ON CONFLICT (record_id) DO NOTHING``, so a batch retried after a lost
acknowledgement or replayed from the spill file is never stored twice. The blocking driver runs
in worker threads, which keeps this backend-neutral (asyncio or trio) like the SQLite one.
The schema is created and migrated here, under an advisory lock so replicas may start together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import anyio.to_thread
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from tenantware.audit import AuditEntry
from tenantware.metering.ledger.auditlog import (
    AUDIT_COLUMNS,
    AuditFilter,
    audit_row,
    entry_from_row,
)
from tenantware.metering.ledger.base import LedgerRejected, LedgerUnavailable
from tenantware.metering.ledger.record import COLUMNS, UsageRecord
from tenantware.metering.ledger.tally import (
    PERIOD_SECONDS,
    SQL_REPORTED,
    SQL_SUMS,
    SQL_TIMED,
    ReportQuery,
    Tally,
    sorted_tallies,
    sql_group,
    tally_from_row,
)

__all__ = ["PostgresLedger"]

_LOCK_ID: Final = 0x7477_6C65_6467  # "twledg": serialises migrations across replicas

_TYPES: Final = {
    "ts": "double precision",
    "status": "integer",
    "input_tokens": "bigint",
    "output_tokens": "bigint",
    "cached_tokens": "bigint",
    "reasoning_tokens": "bigint",
    "cost_nanousd": "bigint",
    "charged_nanousd": "bigint",
    "queue_wait_s": "double precision",
    "upstream_latency_s": "double precision",
    "latency_s": "double precision",
    "ttft_s": "double precision",
    "stream": "boolean",
    "estimated": "boolean",
    "usage_invalid": "boolean",
}
_NULLABLE: Final = frozenset({"upstream_latency_s", "ttft_s"})
#: Columns a later migration adds (the first one creates the table without them).
_ADDED_LATER: Final = frozenset({"usage_invalid"})
#: Errors caused by the records themselves (out of range, NUL in text, a constraint):
#: writing them again cannot succeed.
_REFUSED: Final = (psycopg.DataError, psycopg.IntegrityError, OverflowError, ValueError, TypeError)

#: Each migration is a list of statements; ``{t}`` is the qualified table name.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE IF NOT EXISTS {t} ("
        + ", ".join(
            f"{name} {_TYPES.get(name, 'text')}"
            + ("" if name in _NULLABLE else " NOT NULL")
            + (" PRIMARY KEY" if name == "record_id" else "")
            for name in COLUMNS
            if name not in _ADDED_LATER
        )
        + ")",
        "CREATE INDEX IF NOT EXISTS usage_records_tenant_ts ON {t} (tenant, ts)",
        "CREATE INDEX IF NOT EXISTS usage_records_ts ON {t} (ts)",
        "CREATE INDEX IF NOT EXISTS usage_records_request_id ON {t} (request_id)",
    ),
    ("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS usage_invalid boolean NOT NULL DEFAULT false",),
    (
        "CREATE TABLE IF NOT EXISTS {a} ("
        "id text PRIMARY KEY, at double precision NOT NULL, version bigint NOT NULL, "
        "request_id text, actor text NOT NULL, role text NOT NULL, action text NOT NULL, "
        "tenant text NOT NULL, key_id text, before_version bigint NOT NULL, "
        "before jsonb, after jsonb, address text)",
        "CREATE INDEX IF NOT EXISTS audit_log_at ON {a} (at)",
        "CREATE INDEX IF NOT EXISTS audit_log_tenant_at ON {a} (tenant, at)",
    ),
)


_SECOND: Final = "floor(ts)::bigint"
#: Memory one report query may sort in (per sort, per worker).
_REPORT_WORK_MEM: Final = "64MB"


def _bucket(query: ReportQuery) -> str:
    width = PERIOD_SECONDS.get(query.period)
    if width is not None:
        return f"({_SECOND} / {width} * {width})"
    if query.period == "all":
        return "0::bigint"
    return (
        "extract(epoch FROM date_trunc('month', "
        f"to_timestamp({_SECOND}) AT TIME ZONE 'UTC'))::bigint"
    )


def _tally_statement(query: ReportQuery) -> str:
    """One grouped scan; ``percentile_disc`` is the nearest-rank percentile (both at once)."""
    percentiles = "ARRAY[0.5, 0.99]::double precision[]"
    return f"""
    SELECT tenant COLLATE "C", {_bucket(query)} AS bucket, {sql_group(query.by)} COLLATE "C" AS grp,
           {SQL_SUMS},
           max(queue_wait_s),
           percentile_disc({percentiles}) WITHIN GROUP (ORDER BY latency_s)
               FILTER (WHERE {SQL_TIMED}),
           percentile_disc({percentiles}) WITHIN GROUP (ORDER BY ttft_s)
               FILTER (WHERE {SQL_TIMED} AND ttft_s IS NOT NULL)
    FROM {{t}} WHERE ts >= %s AND ts < %s AND {SQL_REPORTED} {{tenant}}
    GROUP BY 1, 2, 3
    """


def _flatten(row: tuple[Any, ...]) -> tuple[Any, ...]:
    latency, ttft = row[-2] or (None, None), row[-1] or (None, None)
    return (*row[:-2], *latency, *ttft)


class PostgresLedger:
    """``PostgresLedger("postgresql://...", schema="public")``."""

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        table: str = "usage_records",
        min_size: int = 1,
        max_size: int = 4,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._schema = schema
        self._table = sql.Identifier(schema, table)
        self._audit = sql.Identifier(schema, "audit_log")
        self._versions = sql.Identifier(schema, "tenantware_schema")
        self._pool_options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout_s,
            "kwargs": {"connect_timeout": max(1, int(timeout_s)), "autocommit": True},
        }
        self._pool: ConnectionPool | None = None
        self._migrated = False
        columns = sql.SQL(", ").join(sql.Identifier(name) for name in COLUMNS)
        arrays = sql.SQL(", ").join(
            sql.SQL("%s::{}[]").format(sql.SQL(_TYPES.get(name, "text"))) for name in COLUMNS
        )
        self._insert = sql.SQL(
            "INSERT INTO {t} ({c}) SELECT * FROM unnest({a}) ON CONFLICT (record_id) DO NOTHING"
        ).format(t=self._table, c=columns, a=arrays)
        self._select = sql.SQL("SELECT {c} FROM {t}").format(c=columns, t=self._table)
        audit_columns = sql.SQL(", ").join(sql.Identifier(name) for name in AUDIT_COLUMNS)
        self._insert_audit = sql.SQL(
            "INSERT INTO {t} ({c}) VALUES ({v}) ON CONFLICT (id) DO NOTHING"
        ).format(
            t=self._audit,
            c=audit_columns,
            v=sql.SQL(", ").join(
                sql.SQL("%s::jsonb" if name in ("before", "after") else "%s")
                for name in AUDIT_COLUMNS
            ),
        )
        self._select_audit = sql.SQL("SELECT {c} FROM {t} WHERE true").format(
            c=audit_columns, t=self._audit
        )

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._ensure)

    def _ensure(self) -> None:
        if self._pool is None:
            # Opened without waiting: an unreachable server must not block the start.
            self._pool = ConnectionPool(self.url, open=False, **self._pool_options)
            self._pool.open(wait=False)
        if not self._migrated:
            self._run(self._migrate)
            self._migrated = True

    def _run(self, work: Any, *args: Any) -> Any:
        assert self._pool is not None
        try:
            with self._pool.connection(timeout=self.timeout_s) as conn:
                return work(conn, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise LedgerUnavailable(f"postgresql: {exc}") from exc
        except _REFUSED as exc:
            raise LedgerRejected(f"postgresql: {exc!r}") from exc
        except psycopg.Error as exc:  # the schema or the server, not the records: retry
            raise LedgerUnavailable(f"postgresql: {exc}") from exc

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
            )
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (version integer NOT NULL)").format(
                    self._versions
                )
            )
            row = conn.execute(sql.SQL("SELECT max(version) FROM {}").format(self._versions))
            found = row.fetchone()
            version = int(found[0]) if found and found[0] is not None else 0
            for number in range(version, len(_MIGRATIONS)):
                for statement in _MIGRATIONS[number]:
                    conn.execute(sql.SQL(statement).format(t=self._table, a=self._audit))
                conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(self._versions),
                    (number + 1,),
                )

    async def write(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        arrays = [[getattr(r, name) for r in records] for name in COLUMNS]
        await anyio.to_thread.run_sync(self._write, arrays)

    def _write(self, arrays: list[list[Any]]) -> None:
        self._ensure()
        self._run(lambda conn: conn.execute(self._insert, arrays))

    async def query(
        self, *, tenant: str | None = None, since: float = 0.0, until: float | None = None
    ) -> list[UsageRecord]:
        return await anyio.to_thread.run_sync(self._query, tenant, since, until)

    def _query(self, tenant: str | None, since: float, until: float | None) -> list[UsageRecord]:
        self._ensure()
        query = self._select + sql.SQL(" WHERE ts >= %s")
        args: list[Any] = [since]
        if until is not None:
            query += sql.SQL(" AND ts < %s")
            args.append(until)
        if tenant is not None:
            query += sql.SQL(" AND tenant = %s")
            args.append(tenant)
        query += sql.SQL(" ORDER BY ts")
        rows = self._run(lambda conn: conn.execute(query, args).fetchall())
        return [UsageRecord(**dict(zip(COLUMNS, row, strict=True))) for row in rows]

    async def tally(self, query: ReportQuery) -> list[Tally]:
        """The report's figures, aggregated by PostgreSQL (see ``tally``)."""
        return await anyio.to_thread.run_sync(self._tally, query)

    def _tally(self, query: ReportQuery) -> list[Tally]:
        self._ensure()
        statement = sql.SQL(_tally_statement(query)).format(
            t=self._table,
            tenant=sql.SQL("AND tenant = %s" if query.tenant is not None else ""),
        )
        until = float("inf") if query.until is None else query.until
        args: list[Any] = [query.since, until]
        if query.tenant is not None:
            args.append(query.tenant)
        rows = self._run(self._aggregate, statement, args)
        return sorted_tallies(tally_from_row(_flatten(tuple(row))) for row in rows)

    @staticmethod
    def _aggregate(conn: psycopg.Connection[Any], statement: sql.Composed, args: list[Any]) -> Any:
        # The percentiles sort every record of a group: in memory rather than in temporary
        # files, and without JIT compilation (it costs more than it saves here).
        with conn.transaction():
            conn.execute(f"SET LOCAL work_mem = '{_REPORT_WORK_MEM}'")
            conn.execute("SET LOCAL jit = off")
            return conn.execute(statement, args).fetchall()

    async def write_audit(self, entry: AuditEntry) -> None:
        row = audit_row(entry)
        await anyio.to_thread.run_sync(self._write_audit, row)

    def _write_audit(self, row: tuple[Any, ...]) -> None:
        self._ensure()
        self._run(lambda conn: conn.execute(self._insert_audit, row))

    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        return await anyio.to_thread.run_sync(self._query_audit, wanted)

    def _query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        self._ensure()
        query = self._select_audit
        args: list[Any] = []
        for column, op, value in (
            ("action", "=", wanted.action),
            ("tenant", "=", wanted.tenant),
            ("at", ">=", wanted.since),
            ("at", "<", wanted.until),
        ):
            if value is not None:
                query += sql.SQL(" AND {} {} %s").format(sql.Identifier(column), sql.SQL(op))
                args.append(value)
        actors = wanted.actors()
        if actors:
            query += sql.SQL(" AND actor = ANY(%s)")
            args.append(actors)
        query += sql.SQL(" ORDER BY at DESC, version DESC LIMIT %s")
        args.append(wanted.limit)
        rows = self._run(lambda conn: conn.execute(query, args).fetchall())
        return [entry_from_row(row) for row in rows]

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)
