"""Export and restore one tenant: export A, delete A, import A gives back the same usage
report, audit trail and logs; B's data is unchanged throughout (by digest); importing twice
changes nothing."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tenantware import KeyHasher
from tenantware.cli import main
from tenantware.metering.ledger import (
    AuditFilter,
    JournalEntry,
    MemoryLedger,
    SqliteLedger,
    UsageRecord,
)
from tenantware.metering.reports import usage_report
from tenantware.stores import open_stores
from tenantware.tenantdata.archive import (
    ArchiveConflict,
    decode_archive,
    encode_archive,
    export_tenant,
    import_tenant,
)
from tests.data_support import ADMIN, KEYS, MASTER_ENV, data_config, master_text, new_master
from tests.metering_support import records_of
from tests.support import CHAT, client_for, in_process_gateway

pytestmark = pytest.mark.anyio

LOGGED = {"log_requests": True, "cache_models": ["*"]}


@pytest.fixture(autouse=True)
def master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MASTER_ENV, master_text(new_master(1)))


async def _digest(gateway: Any, tenant: str) -> str:
    """Everything kept of ``tenant``, hashed."""
    ledger = gateway.ledger
    assert isinstance(ledger, MemoryLedger)
    record = await gateway.registry_store.get(tenant)
    parts = [
        msgspec.json.encode(record.tenant if record else None),
        msgspec.json.encode(await ledger.query(tenant=tenant)),
        msgspec.json.encode(await ledger.query_audit(AuditFilter(tenant=tenant, limit=10**6))),
        msgspec.json.encode(await gateway.log_store.read(tenant, limit=10**6)),
        await gateway.log_store.get_salt(tenant) or b"",
    ]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


async def _traffic(gateway: Any) -> None:
    app = gateway.asgi_app()
    for tenant in ("acme", "globex"):
        async with client_for(app, KEYS[tenant]) as client:
            for n in range(3):
                body = {**CHAT, "max_tokens": 5 + n % 2}  # two cache hits among them
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    async with client_for(app, ADMIN) as admin:
        changed = await admin.patch("/admin/tenants/acme", json={"name": "Acme Corp"})
        assert changed.status_code == 200


async def test_export_delete_import_gives_back_the_tenant_and_leaves_others_unchanged() -> None:
    gateway, _ = in_process_gateway(config=data_config(**LOGGED))
    app = gateway.asgi_app()
    stores = {
        "registry": gateway.registry_store,
        "ledger": gateway.ledger,
        "logs": gateway.log_store,
    }
    async with gateway.running():
        await _traffic(gateway)
        await records_of(gateway)  # flushed
        report = await usage_report(gateway.ledger, tenant="acme")
        trail = await gateway.ledger.query_audit(AuditFilter(tenant="acme"))
        async with client_for(app, KEYS["acme"]) as acme:
            logs = (await acme.get("/admin/tenants/acme/logs")).json()["data"]
        other = await _digest(gateway, "globex")

        archive = decode_archive(encode_archive(await export_tenant("acme", **stores)))
        async with client_for(app, ADMIN) as admin:
            assert (await admin.delete("/admin/tenants/acme")).status_code == 200
        assert await gateway.log_store.read("acme") == []
        assert await _digest(gateway, "globex") == other

        first = await import_tenant(archive, **stores)
        again = await import_tenant(archive, **stores)
        await gateway.registry.refresh()
        cutoff = time.time()
        async with client_for(app, KEYS["acme"]) as acme:
            restored_logs = (await acme.get("/admin/tenants/acme/logs")).json()["data"]
            works = await acme.post("/v1/chat/completions", json=CHAT)
        await records_of(gateway)
        restored_trail = await gateway.ledger.query_audit(AuditFilter(tenant="acme"))
        restored_report = await usage_report(gateway.ledger, tenant="acme", until=cutoff)
        assert await _digest(gateway, "globex") == other
    assert first.registry_written
    assert first.request_logs_added == len(logs) == 3
    assert not again.registry_written
    assert again.request_logs_added == 0
    assert restored_report == report
    assert restored_logs == logs
    # The trail keeps what it had, then the deletion and the import on top.
    assert [e.id for e in restored_trail if e.id in {t.id for t in trail}] == [t.id for t in trail]
    assert works.status_code == 200  # the same API key works again (its hash came back)


def _prepaid(config: Any) -> Any:
    """``config`` with acme and globex paying from prepaid balances."""
    tenants = [
        msgspec.structs.replace(t, billing="prepaid") if t.id in ("acme", "globex") else t
        for t in config.tenants
    ]
    return msgspec.structs.replace(config, tenants=tenants)


async def _balance_of(gateway: Any, tenant: str) -> tuple[int | None, list[Any]]:
    """The balance in the quota store and the journal, oldest first."""
    entries = await gateway.ledger.entries(tenant, limit=10**6)
    return await gateway.balances.balance(tenant), entries[::-1]


async def test_export_delete_import_gives_back_the_balance_and_its_journal() -> None:
    gateway, _ = in_process_gateway(config=_prepaid(data_config(**LOGGED)))
    app = gateway.asgi_app()
    stores = {
        "registry": gateway.registry_store,
        "ledger": gateway.ledger,
        "logs": gateway.log_store,
    }
    async with gateway.running():
        async with client_for(app, ADMIN) as admin:
            for tenant in ("acme", "globex"):
                topped = await admin.post(
                    f"/admin/tenants/{tenant}/balance/topups",
                    json={"amount_usd": "0.05"},
                    headers={"idempotency-key": f"first-{tenant}"},
                )
                assert topped.status_code == 201, topped.text
        await _traffic(gateway)
        await records_of(gateway)  # flushed: the debits are journaled
        balance, journal = await _balance_of(gateway, "acme")
        assert [e.kind for e in journal][:2] == ["topup", "debit"]
        assert balance == sum(e.amount_nanousd for e in journal) < 50_000_000
        other = (await _digest(gateway, "globex"), await _balance_of(gateway, "globex"))

        archive = decode_archive(encode_archive(await export_tenant("acme", **stores)))
        assert archive.balance_journal == journal
        async with client_for(app, ADMIN) as admin:
            assert (await admin.delete("/admin/tenants/acme")).status_code == 200
        for _ in range(2):  # the journal is append-only: nothing is added, nothing twice
            again = await import_tenant(archive, **stores, balances=gateway.balances)
            assert again.balance_entries_added == 0
        assert await _balance_of(gateway, "acme") == (balance, journal)
        assert (await _digest(gateway, "globex"), await _balance_of(gateway, "globex")) == other

    # Into another deployment (its own ledger and quota store): the journal comes whole and
    # the store is given its sum, once however often the archive is imported.
    target, _ = in_process_gateway(config=_prepaid(data_config(**LOGGED)))
    stores = {"registry": target.registry_store, "ledger": target.ledger, "logs": target.log_store}
    async with target.running():
        first = await import_tenant(archive, **stores, balances=target.balances)
        second = await import_tenant(archive, **stores, balances=target.balances)
        assert (first.balance_entries_added, first.balance_restored) == (len(journal), True)
        assert (second.balance_entries_added, second.balance_restored) == (0, False)
        restored = await _balance_of(target, "acme")
        assert restored == (balance, journal)
        assert all(check.ok for check in await target.balances.verify(["acme"]))

    # Where the tenant already holds a balance the journal would not match: refused.
    busy, _ = in_process_gateway(config=_prepaid(data_config(**LOGGED)))
    async with busy.running(), client_for(busy.asgi_app(), ADMIN) as admin:
        topped = await admin.post(
            "/admin/tenants/acme/balance/topups",
            json={"amount_usd": "1"},
            headers={"idempotency-key": "elsewhere"},
        )
        assert topped.status_code == 201
        with pytest.raises(ArchiveConflict, match="prepaid balance here"):
            await import_tenant(
                archive,
                registry=busy.registry_store,
                ledger=busy.ledger,
                logs=busy.log_store,
                balances=busy.balances,
            )
        assert await busy.balances.balance("acme") == 1_000_000_000


async def test_an_archive_is_refused_where_the_tenant_has_other_key_material() -> None:
    gateway, _ = in_process_gateway(config=data_config(**LOGGED))
    stores = {
        "registry": gateway.registry_store,
        "ledger": gateway.ledger,
        "logs": gateway.log_store,
    }
    async with gateway.running():
        await _traffic(gateway)
        archive = await export_tenant("acme", **stores)
        await gateway.log_store.destroy_salt("acme")
        await gateway.log_store.create_salt("acme", b"\x00" * 32)
        with pytest.raises(ArchiveConflict, match="other key material"):
            await import_tenant(archive, **stores)
    with pytest.raises(ArchiveConflict, match="not a tenant archive"):
        decode_archive(b'{"format": "zip"}')


def _deployment(
    tmp_path: Path, name: str, redis_url: str, prefix: str, *, shared_store: bool = False
) -> Path:
    """A configuration file: a shared Redis registry and a SQLite ledger of its own (and,
    ``shared_store``, its quota store in Redis)."""
    hasher = KeyHasher()
    path = tmp_path / f"{name}.json"
    config = {
        "gateway": {
            "registry_url": redis_url,
            "redis_prefix": f"{prefix}{name}:",
            **({"redis_url": redis_url} if shared_store else {}),
        },
        "metering": {"ledger_url": f"sqlite:///{tmp_path / name}.db"},
        "tenants": [
            {"id": t, "keys": [{"id": f"{t}-1", "hash": hasher.hash(KEYS[t])}]}
            for t in ("acme", "globex")
        ],
    }
    path.write_text(json.dumps(config))
    return path


def test_cli_exports_a_tenant_and_imports_it_into_another_deployment(
    tmp_path: Path, redis_url: str, redis_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _deployment(tmp_path, "one", redis_url, redis_prefix)
    target = _deployment(tmp_path, "two", redis_url, redis_prefix, shared_store=True)
    assert main(["registry", "import", "--config", str(source), str(source)]) == 0
    ledger = SqliteLedger(tmp_path / "one.db")
    records = [
        UsageRecord(record_id=f"{t}-{n}", request_id="r", ts=float(n), tenant=t, cost_nanousd=n)
        for t in ("acme", "globex")
        for n in range(4)
    ]
    anyio.run(ledger.write, records)
    credits = [
        JournalEntry(
            id=f"bal-{t}", tenant_id=t, at=1.0, kind="topup", amount_nanousd=7, reference=f"x:{t}"
        )
        for t in ("acme", "globex")
    ]
    for credit in credits:
        anyio.run(ledger.append, credit)
    archive = tmp_path / "acme.tw.json"
    assert main(["tenants", "export", "acme", "--config", str(source), "-o", str(archive)]) == 0
    capsys.readouterr()
    reports = []
    for _ in range(2):  # twice: the second import adds nothing
        assert main(["tenants", "import", str(archive), "--config", str(target)]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["registry_written"]
    assert reports[0]["usage_records"] == 4
    assert not reports[1]["registry_written"]
    # The balance went into the target's shared quota store, once.
    assert (reports[0]["balance_restored"], reports[1]["balance_restored"]) == (True, False)

    async def balance() -> int | None:
        stores = open_stores(redis_url, prefix=f"{redis_prefix}two:")
        try:
            return await stores.quota_store().balance("acme")
        finally:
            await stores.aclose()

    assert anyio.run(balance) == 7
    imported = anyio.run(lambda: SqliteLedger(tmp_path / "two.db").query())
    assert imported == [r for r in records if r.tenant == "acme"]
    journal = anyio.run(lambda: SqliteLedger(tmp_path / "two.db").totals())
    assert journal == {"acme": 7}
    assert main(["tenants", "export", "nobody", "--config", str(source)]) == 1


def test_cli_expands_environment_references_in_every_url_it_opens(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``${NAME}`` in the ledger, registry and store URLs is expanded by the command line as
    by the gateway: ``tenants export``/``import`` and ``usage`` open the ledger the gateway
    writes to."""
    monkeypatch.setenv("TW_TEST_LEDGER_DIR", str(tmp_path))
    monkeypatch.setenv("TW_TEST_REDIS_URL", redis_url)
    source = _deployment(tmp_path, "one", "${TW_TEST_REDIS_URL}", redis_prefix)
    target = _deployment(tmp_path, "two", "${TW_TEST_REDIS_URL}", redis_prefix, shared_store=True)
    for path in (source, target):
        path.write_text(path.read_text().replace(str(tmp_path), "${TW_TEST_LEDGER_DIR}"))
    assert "${TW_TEST_LEDGER_DIR}/one.db" in source.read_text()
    assert main(["registry", "import", "--config", str(source), str(source)]) == 0
    record = UsageRecord(record_id="acme-1", request_id="r", ts=1.0, tenant="acme", cost_nanousd=9)
    anyio.run(SqliteLedger(tmp_path / "one.db").write, [record])
    credit = JournalEntry(
        id="bal-acme", tenant_id="acme", at=1.0, kind="topup", amount_nanousd=7, reference="x"
    )
    anyio.run(SqliteLedger(tmp_path / "one.db").append, credit)
    archive = tmp_path / "acme.tw.json"
    assert main(["tenants", "export", "acme", "--config", str(source), "-o", str(archive)]) == 0
    assert decode_archive(archive.read_bytes()).usage_records == [record]
    capsys.readouterr()
    assert main(["tenants", "import", str(archive), "--config", str(target)]) == 0
    assert json.loads(capsys.readouterr().out)["balance_restored"]
    assert anyio.run(lambda: SqliteLedger(tmp_path / "two.db").query()) == [record]
    for where in (
        ["--config", str(target)],
        ["--ledger", "sqlite:///${TW_TEST_LEDGER_DIR}/two.db"],
    ):
        assert main(["usage", *where, "--since", "1970-01-01", "--format", "records"]) == 0
        assert "acme-1" in capsys.readouterr().out
    monkeypatch.delenv("TW_TEST_LEDGER_DIR")
    assert main(["tenants", "export", "acme", "--config", str(source)]) == 2
    assert "TW_TEST_LEDGER_DIR is not set" in capsys.readouterr().err
