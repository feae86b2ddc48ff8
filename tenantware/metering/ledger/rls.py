"""Row-level security for every table of the ledger database that holds tenant rows.

One SQL function, created with the schema, protects a table by the name of its tenant
column: ``SELECT tenantware_protect('schema.table', 'tenant_id')``. A protected table shows
and accepts a row only when its tenant is the one bound for the transaction
(``SELECT set_config('tenantware.tenant', 'acme', true)``, which is ``SET LOCAL``): a query
that forgets its tenant filter still sees one tenant's rows, and a connection that bound no
tenant sees none. The table's owner (the role that runs the migrations) and roles with
``BYPASSRLS`` (the admin role) are not subject to it; the gateway's role is.
"""

from __future__ import annotations

from typing import Any, Final

from psycopg import sql

__all__ = [
    "BIND_TENANT",
    "MIGRATION_LOCK",
    "PROTECT_FUNCTION",
    "TENANT_SETTING",
    "bind_tenant",
    "create_function",
    "function_name",
    "protect",
]

#: Advisory lock ("twledg") every migration of the ledger database takes (the ledger's and the
#: logbook's tables), so replicas starting together create and protect them once.
MIGRATION_LOCK: Final = 0x7477_6C65_6467

#: The setting a transaction binds its tenant with.
TENANT_SETTING: Final = "tenantware.tenant"

#: Creates ``{schema}.tenantware_protect(table, column)`` (``{f}``: the qualified name).
PROTECT_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION {f}(tbl regclass, col text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('DROP POLICY IF EXISTS tenantware_tenant_rows ON %s', tbl);
    EXECUTE format(
        'CREATE POLICY tenantware_tenant_rows ON %s '
        'USING (%I = current_setting(''tenantware.tenant'', true)) '
        'WITH CHECK (%I = current_setting(''tenantware.tenant'', true))',
        tbl, col, col);
END
$fn$
"""

BIND_TENANT: Final = "SELECT set_config('tenantware.tenant', %s, true)"


def function_name(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, "tenantware_protect")


def create_function(conn: Any, schema: str) -> None:
    """Create (or replace) the protect function in ``schema``."""
    conn.execute(sql.SQL(PROTECT_FUNCTION).format(f=function_name(schema)))


def protect(conn: Any, schema: str, table: str, column: str = "tenant") -> None:
    """Put ``schema.table`` under row-level security by its ``column``."""
    conn.execute(
        sql.SQL("SELECT {}(%s::regclass, %s)").format(function_name(schema)),
        (sql.Identifier(schema, table).as_string(conn), column),
    )


def bind_tenant(conn: Any, tenant: str) -> None:
    """Bind ``tenant`` for the rest of the current transaction (``SET LOCAL``)."""
    conn.execute(BIND_TENANT, (tenant,))
