"""The embedded default ledger: SQLite in WAL mode, written in batches from a worker thread.

A committed batch is in the WAL file, so a killed process loses nothing it had committed;
``synchronous=NORMAL`` trades only power-loss durability of the last commits for speed.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, Final

import anyio.to_thread

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
    sql_rank,
    tally_from_row,
)

__all__ = ["SqliteLedger"]

_SCHEMA_VERSION = 4
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS usage_records (
        record_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts REAL NOT NULL,
        tenant TEXT NOT NULL,
        cost_center TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model_requested TEXT NOT NULL,
        model_served TEXT NOT NULL,
        upstream TEXT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_nanousd INTEGER NOT NULL,
        charged_nanousd INTEGER NOT NULL,
        queue_wait_s REAL NOT NULL,
        upstream_latency_s REAL,
        latency_s REAL NOT NULL,
        ttft_s REAL,
        stream INTEGER NOT NULL,
        estimated INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS usage_records_tenant_ts ON usage_records (tenant, ts);
    CREATE INDEX IF NOT EXISTS usage_records_ts ON usage_records (ts);
    CREATE INDEX IF NOT EXISTS usage_records_request_id ON usage_records (request_id);
    """,
    "ALTER TABLE usage_records ADD COLUMN usage_invalid INTEGER NOT NULL DEFAULT 0;",
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id TEXT PRIMARY KEY,
        at REAL NOT NULL,
        version INTEGER NOT NULL,
        request_id TEXT,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT,
        before_version INTEGER NOT NULL,
        before TEXT,
        after TEXT,
        address TEXT
    );
    CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
    CREATE INDEX IF NOT EXISTS audit_log_tenant_at ON audit_log (tenant, at);
    """,
    """
    ALTER TABLE usage_records ADD COLUMN balance_debit_nanousd INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN own_upstream_key INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS balance_journal (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        amount_nanousd INTEGER NOT NULL,
        reference TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL,
        actor TEXT NOT NULL,
        note TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS balance_journal_tenant_at ON balance_journal (tenant_id, at);
    CREATE TRIGGER IF NOT EXISTS balance_journal_no_update BEFORE UPDATE ON balance_journal
    BEGIN SELECT RAISE(ABORT, 'the balance journal is append-only'); END;
    CREATE TRIGGER IF NOT EXISTS balance_journal_no_delete BEFORE DELETE ON balance_journal
    BEGIN SELECT RAISE(ABORT, 'the balance journal is append-only'); END;
    CREATE TABLE IF NOT EXISTS redemption_codes (
        code_hash TEXT PRIMARY KEY,
        batch_id TEXT NOT NULL,
        amount_nanousd INTEGER NOT NULL,
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL,
        tenant_id TEXT,
        expires_at REAL
    );
    """,
)
assert len(_MIGRATIONS) == _SCHEMA_VERSION

_INSERT = (
    f"INSERT OR IGNORE INTO usage_records ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM usage_records"
_INSERT_AUDIT = (
    f"INSERT OR IGNORE INTO audit_log ({', '.join(AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in AUDIT_COLUMNS)})"
)
_SELECT_AUDIT = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log WHERE 1 = 1"
_INSERT_JOURNAL = (
    f"INSERT OR IGNORE INTO balance_journal ({', '.join(JOURNAL_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in JOURNAL_COLUMNS)})"
)
_SELECT_JOURNAL = f"SELECT {', '.join(JOURNAL_COLUMNS)} FROM balance_journal"
_INSERT_CODE = (
    f"INSERT INTO redemption_codes ({', '.join(CODE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in CODE_COLUMNS)})"
)
_SELECT_CODE = f"SELECT {', '.join(CODE_COLUMNS)} FROM redemption_codes WHERE code_hash = ?"
_CREDIT_KINDS_SQL = ", ".join(f"'{kind}'" for kind in sorted(CREDIT_KINDS))


#: ``floor(ts)`` (SQLite may be built without ``floor``).
_SECOND: Final = "(CAST(ts AS INTEGER) - (ts < CAST(ts AS INTEGER)))"


def _bucket(query: ReportQuery) -> str:
    width = PERIOD_SECONDS.get(query.period)
    if width is not None:
        return f"({_SECOND} / {width} * {width})"
    if query.period == "all":
        return "0"
    return f"CAST(strftime('%s', {_SECOND}, 'unixepoch', 'start of month') AS INTEGER)"


def _tally_sql(query: ReportQuery) -> tuple[str, list[object]]:
    """One statement: sums per group, nearest-rank percentiles with window functions."""
    where = f"ts >= ? AND {SQL_REPORTED}"
    args: list[object] = [query.since]
    if query.until is not None:
        where += " AND ts < ?"
        args.append(query.until)
    if query.tenant is not None:
        where += " AND tenant = ?"
        args.append(query.tenant)
    part = "PARTITION BY tenant, bucket, grp"
    statement = f"""
    WITH base AS (
        SELECT tenant, {_bucket(query)} AS bucket, {sql_group(query.by)} AS grp, outcome,
               input_tokens, output_tokens, cached_tokens, cost_nanousd, charged_nanousd,
               queue_wait_s, latency_s, ttft_s
        FROM usage_records WHERE {where}
    ),
    totals AS (
        SELECT tenant, bucket, grp, {SQL_SUMS}, max(queue_wait_s) AS wait
        FROM base GROUP BY tenant, bucket, grp
    ),
    timed AS (
        SELECT tenant, bucket, grp, latency_s, ttft_s,
               row_number() OVER ({part} ORDER BY latency_s) AS lr,
               count(*) OVER ({part}) AS ln,
               row_number() OVER ({part}, ttft_s IS NULL ORDER BY ttft_s) AS tr,
               count(ttft_s) OVER ({part}) AS tn
        FROM base WHERE {SQL_TIMED}
    ),
    picked AS (
        SELECT tenant, bucket, grp,
               max(CASE WHEN lr = {sql_rank(0.5, "ln")} THEN latency_s END) AS p50,
               max(CASE WHEN lr = {sql_rank(0.99, "ln")} THEN latency_s END) AS p99,
               max(CASE WHEN ttft_s IS NOT NULL AND tr = {sql_rank(0.5, "tn")}
                   THEN ttft_s END) AS t50,
               max(CASE WHEN ttft_s IS NOT NULL AND tr = {sql_rank(0.99, "tn")}
                   THEN ttft_s END) AS t99
        FROM timed GROUP BY tenant, bucket, grp
    )
    SELECT totals.*, picked.p50, picked.p99, picked.t50, picked.t99
    FROM totals LEFT JOIN picked
    ON picked.tenant = totals.tenant AND picked.bucket = totals.bucket AND picked.grp = totals.grp
    """
    return statement, args


#: Errors caused by the records themselves (a value out of SQLite's 64-bit integers, a
#: type it cannot store, a constraint): writing them again cannot succeed.
_REFUSED: Final = (
    OverflowError,
    TypeError,
    ValueError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
)

#: A record's column values as a tuple: one C call per record (rows are built on the loop).
_row: Callable[[UsageRecord], tuple[object, ...]] = attrgetter(*COLUMNS)


def _record(row: Sequence[object]) -> UsageRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    values["stream"] = bool(values["stream"])
    values["estimated"] = bool(values["estimated"])
    values["usage_invalid"] = bool(values["usage_invalid"])
    values["own_upstream_key"] = bool(values["own_upstream_key"])
    return UsageRecord(**values)  # type: ignore[arg-type]


class SqliteLedger:
    """``SqliteLedger("usage.db")``: one connection, used by one worker thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open)

    def _open(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=5000")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for number in range(version, _SCHEMA_VERSION):
                    conn.executescript(
                        "BEGIN;" + _MIGRATIONS[number] + f"PRAGMA user_version={number + 1};COMMIT;"
                    )
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"sqlite {self.path}: {exc}") from exc
            self._conn = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._open()
        assert self._conn is not None
        return self._conn

    async def write(self, records: Sequence[UsageRecord]) -> None:
        if records:
            rows = [_row(r) for r in records]
            debits = [entry_row(e) for e in debit_entries(records)]
            await anyio.to_thread.run_sync(self._write, rows, _INSERT, debits)

    # -- the balance journal -----------------------------------------------------------

    async def append(self, entry: JournalEntry) -> JournalEntry:
        return await anyio.to_thread.run_sync(self._append, entry)

    def _append(self, entry: JournalEntry) -> JournalEntry:
        self._write([entry_row(entry)], _INSERT_JOURNAL)
        found = self._select(_SELECT_JOURNAL + " WHERE reference = ?", [entry.reference])
        return journal_entry(found[0])

    async def entries(self, tenant_id: str, *, limit: int = 100) -> list[JournalEntry]:
        sql = _SELECT_JOURNAL + " WHERE tenant_id = ? ORDER BY at DESC, rowid DESC LIMIT ?"
        rows = await anyio.to_thread.run_sync(self._select, sql, [tenant_id, limit])
        return [journal_entry(row) for row in rows]

    async def totals(self) -> dict[str, int]:
        sql = "SELECT tenant_id, SUM(amount_nanousd) FROM balance_journal GROUP BY tenant_id"
        rows = await anyio.to_thread.run_sync(self._select, sql, [])
        return {str(row[0]): int(row[1]) for row in rows}

    async def credit_ids(self, tenant_id: str) -> list[str]:
        sql = (
            f"SELECT id FROM balance_journal WHERE tenant_id = ? AND kind IN ({_CREDIT_KINDS_SQL})"
        )
        rows = await anyio.to_thread.run_sync(self._select, sql, [tenant_id])
        return [str(row[0]) for row in rows]

    async def add_codes(self, codes: Sequence[RedemptionCode]) -> None:
        await anyio.to_thread.run_sync(self._write, [code_row(c) for c in codes], _INSERT_CODE)

    async def code(self, code_hash: str) -> RedemptionCode | None:
        rows = await anyio.to_thread.run_sync(self._select, _SELECT_CODE, [code_hash])
        return code_from_row(rows[0]) if rows else None

    def _select(self, sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                rows: list[tuple[Any, ...]] = self._connection().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"sqlite {self.path}: {exc}") from exc
        return rows

    async def write_audit(self, entry: AuditEntry) -> None:
        await anyio.to_thread.run_sync(self._write, [audit_row(entry)], _INSERT_AUDIT)

    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        return await anyio.to_thread.run_sync(self._query_audit, wanted)

    def _query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        sql = _SELECT_AUDIT
        args: list[object] = []
        for column, op, value in wanted.conditions():
            sql += f" AND {column} {op} ?"
            args.append(value)
        actors = wanted.actors()
        if actors:
            sql += f" AND actor IN ({', '.join('?' for _ in actors)})"
            args.extend(actors)
        sql += " ORDER BY at DESC, version DESC LIMIT ?"
        args.append(wanted.limit)
        return [entry_from_row(row) for row in self._select(sql, args)]

    def _write(
        self,
        rows: list[tuple[object, ...]],
        insert: str = _INSERT,
        debits: list[tuple[object, ...]] | None = None,
    ) -> None:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(insert, rows)
                if debits:
                    conn.executemany(_INSERT_JOURNAL, debits)
                conn.execute("COMMIT")
            except BaseException as exc:
                # Whatever failed (a value Python cannot bind raises OverflowError, not a
                # sqlite3.Error), the transaction must not stay open: the next BEGIN would fail.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, _REFUSED):
                    raise LedgerRejected(f"sqlite {self.path}: {exc!r}") from exc
                if isinstance(exc, sqlite3.Error):
                    raise LedgerUnavailable(f"sqlite {self.path}: {exc}") from exc
                raise

    async def query(
        self, *, tenant: str | None = None, since: float = 0.0, until: float | None = None
    ) -> list[UsageRecord]:
        return await anyio.to_thread.run_sync(self._query, tenant, since, until)

    def _query(self, tenant: str | None, since: float, until: float | None) -> list[UsageRecord]:
        sql = _SELECT + " WHERE ts >= ?"
        args: list[object] = [since]
        if until is not None:
            sql += " AND ts < ?"
            args.append(until)
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        with self._lock:
            rows = self._connection().execute(sql + " ORDER BY ts", args).fetchall()
        return [_record(row) for row in rows]

    async def tally(self, query: ReportQuery) -> list[Tally]:
        """The report's figures, aggregated by SQLite (see ``tally``)."""
        return await anyio.to_thread.run_sync(self._tally, query)

    def _tally(self, query: ReportQuery) -> list[Tally]:
        rows = self._select(*_tally_sql(query))
        return coarsen(sorted_tallies(tally_from_row(row) for row in rows), query)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
