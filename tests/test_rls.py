"""Row-level security on the real PostgreSQL server: a connection of the gateway's role bound
to tenant A sees, changes and writes only A's rows in every protected table, whatever its
query says; the owner (admin) role sees everything."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tenantware.audit import AuditEntry
from tenantware.crypto import KeyRing, StaticKeyProvider
from tenantware.logbook import LoggedExchange, seal_row
from tenantware.logbook.postgres import PostgresLogStore
from tenantware.metering.ledger import UsageRecord
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.metering.ledger.rls import BIND_TENANT, protect
from tenantware.metering.ledger.tally import ReportQuery
from tests.data_support import new_master

pytestmark = pytest.mark.anyio

PROTECTED = (
    "usage_records",
    "usage_hourly",
    "usage_hourly_histograms",
    "usage_daily_histograms",
    "audit_log",
    "tenant_keys",
    "request_logs",
)
_COPIED_KEYS = ("record_id", "id")


@pytest.fixture
def gateway_role(postgres_url: str, postgres_schema: str) -> Iterator[str]:
    """A login role like the gateway's (no superuser, no BYPASSRLS), unique to this test and
    dropped after it; granted the rows of the schema as the docs tell a DBA to."""
    role = f"tw_gateway_{uuid.uuid4().hex[:10]}"
    schema = sql.Identifier(postgres_schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS").format(sql.Identifier(role))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role)))
    try:
        yield role
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _grant(postgres_url: str, schema: str, role: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )


def _record(tenant: str, n: int) -> UsageRecord:
    return UsageRecord(record_id=f"{tenant}-{n}", request_id=f"r{n}", ts=1000.0 + n, tenant=tenant)


def _audit(tenant: str) -> AuditEntry:
    return AuditEntry(
        id=f"aud_{tenant}", at=1.0, actor="admin:ops", action="tenant.create", tenant=tenant,
        before_version=0,
    )  # fmt: skip


async def _fill(url: str, schema: str) -> None:
    """Rows of tenants a and b in every protected table, written through the library."""
    ledger = PostgresLedger(url, schema=schema)
    logs = PostgresLogStore(url, schema=schema)
    try:
        await ledger.open()
        await logs.open()
        await ledger.write([_record(t, n) for t in ("a", "b") for n in range(3)])
        for tenant in ("a", "b"):
            await ledger.write_audit(_audit(tenant))
            keys = await KeyRing(StaticKeyProvider(new_master(1)), logs).keys(tenant)
            assert keys is not None
            exchange = LoggedExchange(
                request_id="r", ts=1.0, path="/", model="m", status=200, outcome="ok",
                request=b"q", response=b"a",
            )  # fmt: skip
            row = seal_row(keys, exchange, row_id=f"log-{tenant}", retention_s=1e9)
            assert await logs.append(row, quota_bytes=10**6)
    finally:
        await ledger.aclose()
        await logs.aclose()


def _tenants(conn: psycopg.Connection[Any], table: sql.Composed) -> list[str]:
    query = sql.SQL("SELECT tenant FROM {}").format(table)  # no tenant filter, on purpose
    return sorted(row[0] for row in conn.execute(query).fetchall())


def _copy_as(conn: psycopg.Connection[Any], schema: str, table: str, tenant: str) -> None:
    """Insert a copy of one visible row relabelled as ``tenant``."""
    names = [
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = %s ORDER BY ordinal_position",
            (schema, table),
        ).fetchall()
    ]
    select = [
        sql.Literal(tenant)
        if name == "tenant"
        else sql.SQL("{} || '-copy'").format(sql.Identifier(name))
        if name in _COPIED_KEYS
        else sql.Identifier(name)
        for name in names
    ]
    conn.execute(
        sql.SQL("INSERT INTO {t} ({c}) SELECT {s} FROM {t} LIMIT 1").format(
            t=sql.Identifier(schema, table),
            c=sql.SQL(", ").join(map(sql.Identifier, names)),
            s=sql.SQL(", ").join(select),
        )
    )


def _write_as_b(conn: psycopg.Connection[Any], schema: str, name: str, attempt: str) -> None:
    if attempt == "relabel":
        conn.execute(sql.SQL("UPDATE {} SET tenant = 'b'").format(sql.Identifier(schema, name)))
    else:
        _copy_as(conn, schema, name, "b")


async def test_a_connection_bound_to_a_never_reads_or_writes_bs_rows(
    postgres_url: str, postgres_schema: str, gateway_role: str
) -> None:
    await _fill(postgres_url, postgres_schema)
    _grant(postgres_url, postgres_schema, gateway_role)
    as_gateway = make_conninfo(postgres_url, user=gateway_role)
    with psycopg.connect(as_gateway) as conn:
        for name in PROTECTED:
            table = sql.Identifier(postgres_schema, name)
            with conn.transaction():
                assert _tenants(conn, table) == [], f"{name}: unbound sees rows"
            with conn.transaction():
                conn.execute(BIND_TENANT, ("a",))
                seen = _tenants(conn, table)
                assert seen, name
                assert set(seen) == {"a"}, name
                b_rows = sql.SQL("DELETE FROM {} WHERE tenant = 'b'").format(table)
                assert conn.execute(b_rows).rowcount == 0, name
                every = sql.SQL("UPDATE {} SET tenant = tenant").format(table)
                assert conn.execute(every).rowcount == len(seen), name
            for attempt in ("relabel", "insert"):
                with conn.transaction():
                    conn.execute(BIND_TENANT, ("a",))
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        _write_as_b(conn, postgres_schema, name, attempt)
    # The owner (the admin role) is not restricted: every row is still there.
    with psycopg.connect(postgres_url) as conn:
        for name in PROTECTED:
            seen = _tenants(conn, sql.Identifier(postgres_schema, name))
            assert set(seen) == {"a", "b"}, name


async def test_the_library_under_the_gateway_role_works_one_tenant_at_a_time(
    postgres_url: str, postgres_schema: str, gateway_role: str
) -> None:
    await _fill(postgres_url, postgres_schema)
    _grant(postgres_url, postgres_schema, gateway_role)
    as_gateway = make_conninfo(postgres_url, user=gateway_role)
    ledger = PostgresLedger(as_gateway, schema=postgres_schema)
    logs = PostgresLogStore(as_gateway, schema=postgres_schema)
    try:
        await ledger.write([_record("a", 9), _record("b", 9)])  # one batch, two tenants
        assert {r.record_id for r in await ledger.query(tenant="a")} == {"a-0", "a-1", "a-2", "a-9"}
        assert await ledger.query() == []  # across tenants: the admin role's business
        # A tenant's report, from the records and from the roll-ups (a range of hours).
        for until in (1500.0, 20_000.0):
            report = await ledger.tally(ReportQuery(tenant="a", until=until, period="all"))
            assert [(t.tenant, t.requests) for t in report] == [("a", 4)], until
            assert await ledger.tally(ReportQuery(until=until)) == [], until
        assert [r.id for r in await logs.read("a")] == ["log-a"]
        assert await logs.used_bytes("b") > 0
    finally:
        await ledger.aclose()
        await logs.aclose()
    with psycopg.connect(postgres_url) as conn:
        table = sql.Identifier(postgres_schema, "usage_records")
        assert _tenants(conn, table).count("b") == 4


def test_one_function_call_protects_any_table_with_a_tenant_column(
    postgres_url: str, postgres_schema: str, gateway_role: str
) -> None:
    """How another table (the balance journal) is put under the same policy."""
    table = sql.Identifier(postgres_schema, "balance_journal")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        from tenantware.metering.ledger.rls import create_function

        create_function(conn, postgres_schema)
        conn.execute(sql.SQL("CREATE TABLE {} (tenant_id text, amount bigint)").format(table))
        conn.execute(sql.SQL("INSERT INTO {} VALUES ('a', 1), ('b', 2), ('b', 3)").format(table))
        protect(conn, postgres_schema, "balance_journal", "tenant_id")
    _grant(postgres_url, postgres_schema, gateway_role)
    with psycopg.connect(make_conninfo(postgres_url, user=gateway_role)) as conn:
        conn.execute(BIND_TENANT, ("b",))
        rows = conn.execute(sql.SQL("SELECT amount FROM {}").format(table)).fetchall()
    assert sorted(rows) == [(2,), (3,)]


async def test_after_a_is_deleted_its_logs_are_unreadable_even_with_database_access(
    postgres_url: str, postgres_schema: str
) -> None:
    from tenantware.cache import MemoryCacheStore
    from tenantware.crypto import Undecryptable
    from tenantware.logbook import open_row
    from tenantware.tenantdata import TenantData

    master = new_master(1)
    logs = PostgresLogStore(postgres_url, schema=postgres_schema)
    try:
        ring = KeyRing(StaticKeyProvider(master), logs)
        for tenant in ("a", "b"):
            keys = await ring.keys(tenant)
            assert keys is not None
            exchange = LoggedExchange(
                request_id="r", ts=1.0, path="/", model="m", status=200, outcome="ok",
                request=f"secret of {tenant}".encode(), response=b"a",
            )  # fmt: skip
            assert await logs.append(
                seal_row(keys, exchange, row_id="l1", retention_s=1e9), quota_bytes=10**6
            )
        with psycopg.connect(postgres_url) as conn:  # what a database dump holds
            table = sql.Identifier(postgres_schema, "request_logs")
            query = sql.SQL("SELECT sealed FROM {} WHERE tenant = 'a'").format(table)
            dumped = [bytes(row[0]) for row in conn.execute(query).fetchall()]
        await TenantData(ring, logs, MemoryCacheStore()).forget("a")
        assert await logs.get_salt("a") is None
        assert await logs.read("a") == []
        fresh = KeyRing(StaticKeyProvider(master), logs)  # the master key, the database
        again = await fresh.keys("a")
        assert again is not None
        for sealed in dumped:
            with pytest.raises(Undecryptable):
                again.open(sealed)
        b_keys = await fresh.keys("b")
        assert b_keys is not None
        (b_row,) = await logs.read("b")
        assert open_row(b_keys, b_row).request == b"secret of b"
    finally:
        await logs.aclose()


async def test_a_log_row_relabelled_as_bs_in_the_database_does_not_open_for_b(
    postgres_url: str, postgres_schema: str
) -> None:
    from tenantware.cache import MemoryCacheStore
    from tenantware.crypto import Undecryptable
    from tenantware.logbook import open_row
    from tenantware.tenantdata import TenantData

    logs = PostgresLogStore(postgres_url, schema=postgres_schema)
    try:
        ring = KeyRing(StaticKeyProvider(new_master(1)), logs)
        a_keys, b_keys = await ring.keys("a"), await ring.keys("b")
        assert a_keys is not None
        assert b_keys is not None
        exchange = LoggedExchange(
            request_id="r", ts=1.0, path="/", model="m", status=200, outcome="ok",
            request=b"secret of a", response=b"x",
        )  # fmt: skip
        await logs.append(
            seal_row(a_keys, exchange, row_id="l1", retention_s=1e9), quota_bytes=10**6
        )
        with psycopg.connect(postgres_url, autocommit=True) as conn:  # someone with DB access
            table = sql.Identifier(postgres_schema, "request_logs")
            conn.execute(sql.SQL("UPDATE {} SET tenant = 'b' WHERE tenant = 'a'").format(table))
        (moved,) = await logs.read("b")
        with pytest.raises(Undecryptable):
            open_row(b_keys, moved)
        # What the API shows b: nothing of a's (the row does not open, so it is left out).
        assert await TenantData(ring, logs, MemoryCacheStore()).read_logs("b") == []
    finally:
        await logs.aclose()
