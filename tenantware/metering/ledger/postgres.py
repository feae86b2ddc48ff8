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
from psycopg.types.numeric import IntLoader
from psycopg_pool import ConnectionPool, PoolTimeout

from tenantware.audit import AuditEntry
from tenantware.metering.ledger.auditlog import (
    AUDIT_COLUMNS,
    AuditFilter,
    audit_row,
    entry_from_row,
)
from tenantware.metering.ledger.base import LedgerRejected, LedgerUnavailable
from tenantware.metering.ledger.journal import (
    CODE_COLUMNS,
    CREDIT_KINDS,
    JOURNAL_COLUMNS,
    JournalEntry,
    RedemptionCode,
    code_from_row,
    code_row,
    debit_entries,
    entry_row,
)
from tenantware.metering.ledger.journal import entry_from_row as journal_entry
from tenantware.metering.ledger.record import COLUMNS, UsageRecord
from tenantware.metering.ledger.rls import MIGRATION_LOCK, bind_tenant, create_function, protect
from tenantware.metering.ledger.rollup import (
    BACKFILL,
    CREATE_TABLES,
    DAILY_HISTOGRAMS,
    DAILY_LATENCY,
    HISTOGRAMS,
    HOURLY,
    HOURLY_HISTOGRAMS,
    add_to_rollups,
    combine,
    statements,
    whole_periods,
)
from tenantware.metering.ledger.tally import (
    PERIOD_SECONDS,
    SQL_REPORTED,
    SQL_SUMS,
    SQL_TIMED,
    ReportQuery,
    Tally,
    coarsen,
    sorted_tallies,
    sql_group,
    tally_from_row,
)

__all__ = ["PostgresLedger"]

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
    "balance_debit_nanousd": "bigint",
    "own_upstream_key": "boolean",
}
_NULLABLE: Final = frozenset({"upstream_latency_s", "ttft_s"})
#: Columns a later migration adds (the first one creates the table without them).
_ADDED_LATER: Final = frozenset({"usage_invalid", "balance_debit_nanousd", "own_upstream_key"})
#: Errors caused by the records themselves (out of range, NUL in text, a constraint):
#: writing them again cannot succeed.
_REFUSED: Final = (psycopg.DataError, psycopg.IntegrityError, OverflowError, ValueError, TypeError)

#: The migration that puts the tables under row-level security (marked by identity).
_PROTECT_TABLES: Final = ("SELECT 'tenantware: row-level security'",)

#: The roll-ups (``rollup``), filled from the records already stored (writers wait until the
#: migration commits, so none is missed); protected by ``_migrate`` like the tables above
#: (marked by identity).
_ROLL_UP: Final = ("LOCK TABLE {t} IN SHARE MODE", *CREATE_TABLES, *BACKFILL)

#: The latency histograms as arrays, one row per hour and per day (reports by hour, and the
#: whole hours of partial days; a day's counts in one row instead of one per bucket), filled
#: (the daily ones from the rows they replace) and protected like the roll-ups above.
_HISTOGRAMS: Final = ("LOCK TABLE {t} IN SHARE MODE", *HISTOGRAMS)

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
    (
        "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS balance_debit_nanousd bigint NOT NULL DEFAULT 0",
        "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS own_upstream_key boolean NOT NULL DEFAULT false",
        "CREATE TABLE IF NOT EXISTS {j} ("
        "id text PRIMARY KEY, tenant_id text NOT NULL, at double precision NOT NULL, "
        "kind text NOT NULL, amount_nanousd bigint NOT NULL, reference text NOT NULL UNIQUE, "
        "fingerprint text NOT NULL, actor text NOT NULL, note text NOT NULL)",
        "CREATE INDEX IF NOT EXISTS balance_journal_tenant_at ON {j} (tenant_id, at)",
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'the balance journal is append-only'; END $$",
        "CREATE TRIGGER balance_journal_append_only BEFORE UPDATE OR DELETE ON {j} "
        "FOR EACH ROW EXECUTE FUNCTION {f}()",
        "CREATE TABLE IF NOT EXISTS {c} ("
        "code_hash text PRIMARY KEY, batch_id text NOT NULL, amount_nanousd bigint NOT NULL, "
        "created_at double precision NOT NULL, created_by text NOT NULL, tenant_id text, "
        "expires_at double precision)",
    ),
    # Row-level security (``rls``) on the tables above: run by ``_migrate`` (it is code).
    # Redemption codes stay outside it: a code any tenant may redeem has no tenant.
    _PROTECT_TABLES,
    _ROLL_UP,
    _HISTOGRAMS,
)


_SECOND: Final = "floor(ts)::bigint"
#: Memory one report query may sort in (per sort, per worker).
_REPORT_WORK_MEM: Final = "64MB"


def _bucket(query: ReportQuery, second: str = _SECOND) -> str:
    """The start of the period holding ``second`` (whole Unix seconds)."""
    width = PERIOD_SECONDS.get(query.period)
    if width is not None:
        return f"({second} / {width} * {width})"
    if query.period == "all":
        return "0::bigint"
    return (
        "extract(epoch FROM date_trunc('month', "
        f"to_timestamp({second}) AT TIME ZONE 'UTC'))::bigint"
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
    FROM {{t}} WHERE ts >= %(since)s AND ts < %(until)s AND {SQL_REPORTED} {{tenant}}
    GROUP BY 1, 2, 3
    """


def _arguments(query: ReportQuery) -> dict[str, Any]:
    until = float("inf") if query.until is None else query.until
    return {"since": query.since, "until": until, "tenant": query.tenant}


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
        self._table_name = table
        self._hourly = sql.Identifier(schema, HOURLY)
        self._daily_latency = sql.Identifier(schema, DAILY_LATENCY)
        self._hourly_histograms = sql.Identifier(schema, HOURLY_HISTOGRAMS)
        self._daily_histograms = sql.Identifier(schema, DAILY_HISTOGRAMS)
        self._audit = sql.Identifier(schema, "audit_log")
        self._versions = sql.Identifier(schema, "tenantware_schema")
        self._journal = sql.Identifier(schema, "balance_journal")
        self._codes = sql.Identifier(schema, "redemption_codes")
        self._append_only = sql.Identifier(schema, "balance_journal_append_only")
        journal_columns = sql.SQL(", ").join(sql.Identifier(n) for n in JOURNAL_COLUMNS)
        self._insert_journal = sql.SQL(
            "INSERT INTO {t} ({c}) VALUES ({v}) ON CONFLICT DO NOTHING"
        ).format(
            t=self._journal,
            c=journal_columns,
            v=sql.SQL(", ").join(sql.Placeholder() for _ in JOURNAL_COLUMNS),
        )
        self._select_journal = sql.SQL("SELECT {c} FROM {t}").format(
            c=journal_columns, t=self._journal
        )
        code_columns = sql.SQL(", ").join(sql.Identifier(n) for n in CODE_COLUMNS)
        self._insert_code = sql.SQL("INSERT INTO {t} ({c}) VALUES ({v})").format(
            t=self._codes,
            c=code_columns,
            v=sql.SQL(", ").join(sql.Placeholder() for _ in CODE_COLUMNS),
        )
        self._select_code = sql.SQL("SELECT {c} FROM {t} WHERE code_hash = %s").format(
            c=code_columns, t=self._codes
        )
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
            add_to_rollups(
                "INSERT INTO {t} ({c}) SELECT * FROM unnest({a}) ON CONFLICT (record_id) DO NOTHING"
            )
        ).format(
            t=self._table,
            c=columns,
            a=arrays,
            h=self._hourly,
            hh=self._hourly_histograms,
            dh=self._daily_histograms,
        )
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
        if self._up_to_date(conn):
            return  # nothing to do: the gateway's role (no DDL rights) gets on at once
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
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
                    conn.execute(
                        sql.SQL(statement).format(
                            t=self._table,
                            a=self._audit,
                            j=self._journal,
                            c=self._codes,
                            f=self._append_only,
                            h=self._hourly,
                            l=self._daily_latency,
                            hh=self._hourly_histograms,
                            dh=self._daily_histograms,
                        )
                    )
                if _MIGRATIONS[number] is _PROTECT_TABLES:
                    create_function(conn, self._schema)
                    protect(conn, self._schema, self._table_name)
                    protect(conn, self._schema, "audit_log")
                    protect(conn, self._schema, "balance_journal", "tenant_id")
                if _MIGRATIONS[number] is _ROLL_UP:
                    protect(conn, self._schema, HOURLY)
                    protect(conn, self._schema, DAILY_LATENCY)
                if _MIGRATIONS[number] is _HISTOGRAMS:
                    protect(conn, self._schema, HOURLY_HISTOGRAMS)
                    protect(conn, self._schema, DAILY_HISTOGRAMS)
                conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(self._versions),
                    (number + 1,),
                )

    def _up_to_date(self, conn: psycopg.Connection[Any]) -> bool:
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (self._versions.as_string(conn),)
        ).fetchone()
        if not found or not found[0]:
            return False
        row = conn.execute(sql.SQL("SELECT max(version) FROM {}").format(self._versions))
        version = row.fetchone()
        return bool(version and version[0] is not None and version[0] >= len(_MIGRATIONS))

    async def write(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        by_tenant: dict[str, list[UsageRecord]] = {}
        for record in records:
            by_tenant.setdefault(record.tenant, []).append(record)
        groups = [
            (
                tenant,
                [[getattr(r, name) for r in group] for name in COLUMNS],
                [entry_row(e) for e in debit_entries(group)],
            )
            for tenant, group in sorted(by_tenant.items())
        ]
        await anyio.to_thread.run_sync(self._write, groups)

    def _write(self, groups: list[tuple[str, list[list[Any]], list[tuple[Any, ...]]]]) -> None:
        # One transaction; each tenant's rows (usage and balance debits) under its own binding
        # (row-level security accepts a row only for the bound tenant). Tenants go in sorted
        # order, so writers in several processes lock the roll-up rows in one order.
        self._ensure()

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                for tenant, arrays, debits in groups:
                    bind_tenant(conn, tenant)
                    conn.execute(self._insert, arrays)
                    if debits:
                        with conn.cursor() as cursor:
                            cursor.executemany(self._insert_journal, debits)

        self._run(work)

    # -- the balance journal -----------------------------------------------------------

    async def append(self, entry: JournalEntry) -> JournalEntry:
        return await anyio.to_thread.run_sync(self._append, entry)

    def _append(self, entry: JournalEntry) -> JournalEntry:
        self._ensure()
        query = self._select_journal + sql.SQL(" WHERE reference = %s")

        def work(conn: psycopg.Connection[Any]) -> Any:
            with conn.transaction():
                bind_tenant(conn, entry.tenant_id)
                conn.execute(self._insert_journal, entry_row(entry))
                return conn.execute(query, (entry.reference,)).fetchone()

        return journal_entry(self._run(work))

    async def entries(self, tenant_id: str, *, limit: int = 100) -> list[JournalEntry]:
        query = self._select_journal + sql.SQL(
            " WHERE tenant_id = %s ORDER BY at DESC, id DESC LIMIT %s"
        )
        rows = await anyio.to_thread.run_sync(self._fetch, query, (tenant_id, limit))
        return [journal_entry(row) for row in rows]

    async def totals(self) -> dict[str, int]:
        query = sql.SQL("SELECT tenant_id, SUM(amount_nanousd) FROM {} GROUP BY tenant_id").format(
            self._journal
        )
        rows = await anyio.to_thread.run_sync(self._fetch, query, ())
        return {str(row[0]): int(row[1]) for row in rows}

    async def credit_ids(self, tenant_id: str) -> list[str]:
        query = sql.SQL("SELECT id FROM {} WHERE tenant_id = %s AND kind = ANY(%s)").format(
            self._journal
        )
        args = (tenant_id, sorted(CREDIT_KINDS))
        rows = await anyio.to_thread.run_sync(self._fetch, query, args)
        return [str(row[0]) for row in rows]

    async def add_codes(self, codes: Sequence[RedemptionCode]) -> None:
        rows = [code_row(c) for c in codes]
        await anyio.to_thread.run_sync(self._add_codes, rows)

    def _add_codes(self, rows: list[tuple[Any, ...]]) -> None:
        self._ensure()

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(self._insert_code, rows)

        self._run(work)

    async def code(self, code_hash: str) -> RedemptionCode | None:
        rows = await anyio.to_thread.run_sync(self._fetch, self._select_code, (code_hash,))
        return code_from_row(rows[0]) if rows else None

    def _fetch(self, query: sql.Composable, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._ensure()
        rows: list[tuple[Any, ...]] = self._run(lambda conn: conn.execute(query, args).fetchall())
        return rows

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
        rows = self._run(lambda conn: _bound_fetch(conn, tenant, query, args))
        return [UsageRecord(**dict(zip(COLUMNS, row, strict=True))) for row in rows]

    async def tally(self, query: ReportQuery) -> list[Tally]:
        """The report's figures, aggregated by PostgreSQL (see ``tally``)."""
        return await anyio.to_thread.run_sync(self._tally, query)

    def _tally(self, query: ReportQuery) -> list[Tally]:
        self._ensure()
        tenant = sql.SQL("AND tenant = %(tenant)s" if query.tenant is not None else "")
        periods = whole_periods(query)
        if periods is None:
            statement = sql.SQL(_tally_statement(query)).format(t=self._table, tenant=tenant)
            rows = self._run(self._aggregate, statement, _arguments(query))
            tallies = (tally_from_row(_flatten(tuple(row))) for row in rows)
            return coarsen(sorted_tallies(tallies), query)
        days = periods["first_day"] < periods["end_day"]
        totals, histograms = (
            sql.SQL(text).format(
                t=self._table,
                h=self._hourly,
                hh=self._hourly_histograms,
                dh=self._daily_histograms,
                tenant=tenant,
            )
            for text in statements(
                lambda column: _bucket(query, column),
                sql_group(query.by),
                tenant="{tenant}",
                days=days,
                by_hour=query.period == "hour",
            )
        )
        args = {**_arguments(query), "dim": query.by, **periods}
        return sorted_tallies(self._run(self._roll_up, totals, histograms, args))

    @staticmethod
    def _aggregate(conn: psycopg.Connection[Any], statement: sql.Composed, args: Any) -> Any:
        # The percentiles sort every record of a group: in memory rather than in temporary
        # files, and without JIT compilation (it costs more than it saves here).
        with conn.transaction(), _integer_sums(conn) as cursor:
            _prepare_report(conn, args["tenant"])
            return cursor.execute(statement, args).fetchall()

    @staticmethod
    def _roll_up(
        conn: psycopg.Connection[Any], totals: sql.Composed, histograms: sql.Composed, args: Any
    ) -> list[Tally]:
        # Both statements see the same records (one snapshot); grouped in memory, without
        # JIT compilation.
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            _prepare_report(conn, args["tenant"])
            with _integer_sums(conn) as cursor:
                sums = cursor.execute(totals, args).fetchall()
                counts = cursor.execute(histograms, args).fetchall()
        return combine(sums, counts)

    async def write_audit(self, entry: AuditEntry) -> None:
        row = audit_row(entry)
        await anyio.to_thread.run_sync(self._write_audit, row)

    def _write_audit(self, row: tuple[Any, ...]) -> None:
        self._ensure()
        tenant = row[AUDIT_COLUMNS.index("tenant")]

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                bind_tenant(conn, tenant)
                conn.execute(self._insert_audit, row)

        self._run(work)

    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        return await anyio.to_thread.run_sync(self._query_audit, wanted)

    def _query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        self._ensure()
        query = self._select_audit
        args: list[Any] = []
        for column, op, value in wanted.conditions():
            query += sql.SQL(" AND {} {} %s").format(sql.Identifier(column), sql.SQL(op))
            args.append(value)
        actors = wanted.actors()
        if actors:
            query += sql.SQL(" AND actor = ANY(%s)")
            args.append(actors)
        query += sql.SQL(" ORDER BY at DESC, version DESC LIMIT %s")
        args.append(wanted.limit)
        rows = self._run(lambda conn: _bound_fetch(conn, wanted.tenant, query, args))
        return [entry_from_row(row) for row in rows]

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)


def _prepare_report(conn: psycopg.Connection[Any], tenant: str | None) -> None:
    """Settings of a report's transaction, and its tenant bound when it names one (so the
    gateway's role, under row-level security, reads that tenant's rows; across tenants only
    the owner or an admin role sees rows)."""
    conn.execute(f"SET LOCAL work_mem = '{_REPORT_WORK_MEM}'")
    conn.execute("SET LOCAL jit = off")
    if tenant is not None:
        bind_tenant(conn, tenant)


def _integer_sums(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """A cursor that reads ``numeric`` as ``int``: a report's sums of integer columns are
    whole numbers of any size, and a report by hour reads thousands (``Decimal`` costs
    several times more to make)."""
    cursor = conn.cursor()
    cursor.adapters.register_loader("numeric", IntLoader)
    return cursor


def _bound_fetch(
    conn: psycopg.Connection[Any], tenant: str | None, query: sql.Composed, args: list[Any]
) -> list[Any]:
    """Rows of ``query``, with ``tenant`` bound when it names one (across tenants: only the
    owner or an admin role, which row-level security does not restrict, sees rows)."""
    if tenant is None:
        return conn.execute(query, args).fetchall()
    with conn.transaction():
        bind_tenant(conn, tenant)
        return conn.execute(query, args).fetchall()
