"""The audit trail in the ledger (SQLite and PostgreSQL): one row per successful admin change,
with the values before and after and never a secret; none for a refused change."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.audit import AuditEntry
from tenantware.metering.ledger import AuditFilter, Ledger, LedgerUnavailable, MemoryLedger
from tenantware.metering.ledger import sqlite as sqlite_ledger
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.metering.ledger.sqlite import SqliteLedger
from tenantware.testing.upstream import FakeUpstream
from tests.support import KEYS, client_for
from tests.test_admin_api import ADMIN, READER, admin_config

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        opened: Ledger = SqliteLedger(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        opened = PostgresLedger(url, schema=request.getfixturevalue("postgres_schema"))
    await opened.open()
    yield opened
    await opened.aclose()


def _gateway(ledger: Ledger) -> Gateway:
    upstream = HttpxUpstreamClient(transport=httpx.ASGITransport(app=FakeUpstream()))
    return Gateway(admin_config(), upstream_client=upstream, ledger=ledger)


async def _trail(admin: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await admin.get("/admin/audit", params=params)
    assert answer.status_code == 200, answer.text
    entries: list[dict[str, Any]] = answer.json()["data"]
    return entries


async def test_one_row_per_successful_change_none_for_refusals(ledger: Ledger) -> None:
    gateway = _gateway(ledger)
    app = gateway.asgi_app()
    started = time.time()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        refusals = [
            await admin.post("/admin/tenants", json={"id": "x", "tier": "gold"}),  # 400
            await admin.patch(
                "/admin/tenants/acme", json={"weight": 2}, headers={"if-match": "99"}
            ),
            await admin.patch("/admin/tenants/nobody", json={"weight": 2}),  # 404
            await admin.post("/admin/tenants/acme/keys/nope/revoke"),  # 404
            await admin.post("/admin/keys/nope/revoke"),  # 404
        ]
        assert [r.status_code for r in refusals] == [400, 412, 404, 404, 404]
        assert await _trail(admin) == []

        created = await admin.post(
            "/admin/tenants", json={"id": "newco", "tier": "pro"}, headers={"x-request-id": "r-1"}
        )
        assert created.status_code == 201, created.text
        patched = await admin.patch("/admin/tenants/newco", json={"weight": 0.5, "name": "New"})
        issued = await admin.post("/admin/tenants/newco/keys", json={"id": "k1"})
        plain = issued.json()["key"]
        async with client_for(app, plain) as tenant:
            rotated = await tenant.post("/admin/tenants/newco/keys/k1/rotate", json={"grace_s": 0})
        assert rotated.status_code == 201, rotated.text
        admin_key = await admin.post("/admin/keys", json={"id": "ops-2"})
        revoked = await admin.post("/admin/keys/ops-2/revoke")
        deleted = await admin.delete("/admin/tenants/newco")
        answers = [created, patched, issued, rotated, admin_key, revoked, deleted]
        assert [a.status_code for a in answers] == [201, 200, 201, 201, 201, 200, 200]
        # Refused after the successes too: still no row for them.
        assert (await admin.delete("/admin/tenants/newco")).status_code == 404

        trail = list(reversed(await _trail(admin)))
        assert [e["action"] for e in trail] == [
            "tenant.create",
            "tenant.update",
            "key.issue",
            "key.rotate",
            "admin_key.issue",
            "admin_key.revoke",
            "tenant.delete",
        ]
        assert len({e["id"] for e in trail}) == len(trail)
        assert [e["request_id"] for e in trail] == [a.headers["x-request-id"] for a in answers]
        assert trail[0]["request_id"] == "r-1"
        assert all(e["address"] for e in trail)
        assert all(started <= e["at"] <= time.time() for e in trail)
        create, update, issue, rotate, key_issue, key_revoke, delete = trail
        assert (create["actor"], create["role"]) == ("admin:ops", "admin")
        assert create.get("before") is None
        assert create["after"]["tier"] == "pro"
        assert create["before_version"] == 0
        assert create["version"] == created.json()["version"]
        assert (update["before"]["weight"], update["after"]["weight"]) == (None, 0.5)
        assert (update["before"]["name"], update["after"]["name"]) == ("", "New")
        assert update["before_version"] == created.json()["version"]
        assert update["version"] == patched.json()["version"]
        assert issue["key_id"] == "k1"
        assert issue["before"]["keys"] == []
        assert [k["id"] for k in issue["after"]["keys"]] == ["k1"]
        assert (rotate["actor"], rotate["role"]) == ("tenant:k1", "tenant")
        old_key = next(k for k in rotate["after"]["keys"] if k["id"] == "k1")
        assert old_key["revoked"] is True
        assert len(rotate["after"]["keys"]) == 2
        assert key_issue.get("before") is None
        assert key_issue["after"]["id"] == "ops-2"
        assert key_revoke["before"]["id"] == "ops-2"
        assert key_revoke.get("after") is None
        assert delete["before"]["id"] == "newco"
        assert delete.get("after") is None

        # No secret anywhere: neither a key hash nor a key itself.
        every_row = json.dumps(trail)
        assert "sha256:" not in every_row
        assert '"hash"' not in every_row
        for secret in (plain, rotated.json()["key"], admin_key.json()["key"], ADMIN, READER):
            assert secret not in every_row
        for key in KEYS.values():
            assert key not in every_row

    # The rows are in the ledger's database itself (read through the ledger, not the API).
    stored = await ledger.query_audit(AuditFilter(limit=100))  # type: ignore[attr-defined]
    assert [e.id for e in stored] == [e["id"] for e in reversed(trail)]


async def test_filters_and_csv(ledger: Ledger) -> None:
    gateway = _gateway(ledger)
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, ADMIN) as admin,
        client_for(app, READER) as reader,
    ):
        for name in ("one", "two"):
            assert (await admin.post("/admin/tenants", json={"id": name})).status_code == 201
        middle = time.time()
        assert (await admin.patch("/admin/tenants/one", json={"weight": 2})).status_code == 200
        async with client_for(app, KEYS["hobby"]) as hobby:
            rotated = await hobby.post("/admin/tenants/hobby/keys/hobby-1/rotate")
        assert rotated.status_code == 201

        assert len(await _trail(reader)) == 4  # read-only keys may read it
        assert [e["tenant"] for e in await _trail(admin, tenant="one")] == ["one", "one"]
        assert [e["action"] for e in await _trail(admin, action="tenant.create")] == [
            "tenant.create",
            "tenant.create",
        ]
        assert [e["tenant"] for e in await _trail(admin, actor="hobby-1")] == ["hobby"]
        assert [e["tenant"] for e in await _trail(admin, actor="tenant:hobby-1")] == ["hobby"]
        assert len(await _trail(admin, actor="ops")) == 3
        assert len(await _trail(admin, actor="admin:ops")) == 3
        assert len(await _trail(admin, since=middle)) == 2
        assert [e["tenant"] for e in await _trail(admin, until=middle)] == ["two", "one"]
        assert len(await _trail(admin, limit=1)) == 1
        for bad in ({"until": "soon"}, {"limit": "0"}, {"format": "xml"}):
            assert (await admin.get("/admin/audit", params=bad)).status_code == 400
        tenant_read = await client_for(app, KEYS["acme"]).get("/admin/audit")
        assert tenant_read.status_code == 403

        exported = await admin.get("/admin/audit", params={"format": "csv", "tenant": "one"})
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [r["action"] for r in rows] == ["tenant.update", "tenant.create"]
        assert json.loads(rows[0]["after"])["weight"] == 2
        assert rows[1]["before"] == ""
        assert "sha256:" not in exported.text


class _AuditDown(MemoryLedger):
    async def write_audit(self, entry: AuditEntry) -> None:
        raise LedgerUnavailable("down for the test")


async def test_a_ledger_that_cannot_store_the_entry_leaves_the_change_standing() -> None:
    gateway = _gateway(_AuditDown())
    app = gateway.asgi_app()
    with structlog.testing.capture_logs() as logs:
        async with gateway.running(), client_for(app, ADMIN) as admin:
            created = await admin.post("/admin/tenants", json={"id": "kept"})
            assert created.status_code == 201
            assert (await admin.get("/admin/tenants/kept")).status_code == 200
    lost = [e for e in logs if e["event"] == "audit entry not stored in the ledger"]
    assert [(e["action"], e["tenant"], e["log_level"]) for e in lost] == [
        ("tenant.create", "kept", "error")
    ]


async def test_a_ledger_of_the_previous_schema_gains_the_audit_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)  # the schema before the audit log (version 2)
    conn.executescript(sqlite_ledger._MIGRATIONS[0] + sqlite_ledger._MIGRATIONS[1])
    conn.execute("PRAGMA user_version=2")
    conn.close()
    ledger = SqliteLedger(path)
    await ledger.open()
    entry = AuditEntry(
        id="aud_1", at=1.0, actor="admin:ops", action="tenant.create", tenant="t", before_version=0
    )
    await ledger.write_audit(entry)
    await ledger.write_audit(entry)  # written twice (a retry): stored once
    assert await ledger.query_audit(AuditFilter()) == [entry]
    await ledger.aclose()


class _AuditUnreadable(MemoryLedger):
    async def query_audit(self, wanted: AuditFilter) -> list[AuditEntry]:
        raise LedgerUnavailable("down for the test")


async def test_an_unreadable_ledger_answers_503() -> None:
    gateway = _gateway(_AuditUnreadable())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        answer = await admin.get("/admin/audit")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "ledger_unavailable"
