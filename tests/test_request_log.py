"""Encrypted request logs: opt-in, readable by the tenant and admins only, retention,
quotas, rotation, and crypto-shredding when the tenant is deleted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from tenantware.crypto import MasterKeys, StaticKeyProvider, Undecryptable
from tenantware.logbook import MemoryLogStore, open_row
from tenantware.logbook.jobs import purge_expired, rotate
from tests.data_support import ADMIN, KEYS, MASTER_ENV, data_config, master_text, new_master
from tests.support import CHAT, client_for, in_process_gateway

pytestmark = pytest.mark.anyio

LOGGED = {"log_requests": True, "log_retention_days": 7}


@pytest.fixture
def master(monkeypatch: pytest.MonkeyPatch) -> MasterKeys:
    keys = new_master(1)
    monkeypatch.setenv(MASTER_ENV, master_text(keys))
    return keys


async def _exchange(gateway: Any, key: str, body: dict[str, Any]) -> Any:
    async with client_for(gateway.asgi_app(), key) as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_logs_are_sealed_and_readable_by_the_tenant_and_admins_only(
    master: MasterKeys,
) -> None:
    gateway, _ = in_process_gateway(config=data_config(**LOGGED))
    app = gateway.asgi_app()
    async with gateway.running():
        answer = await _exchange(gateway, KEYS["acme"], CHAT)
        await _exchange(gateway, KEYS["plain"], CHAT)
        async with client_for(app, KEYS["acme"]) as acme:
            own = await acme.get("/admin/tenants/acme/logs")
        async with client_for(app, ADMIN) as admin:
            by_admin = await admin.get("/admin/tenants/acme/logs")
            storage = await admin.get("/admin/tenants/acme/storage")
        async with client_for(app, KEYS["globex"]) as globex:
            other = await globex.get("/admin/tenants/acme/logs")
    assert own.status_code == by_admin.status_code == 200
    (entry,) = own.json()["data"]
    assert entry == by_admin.json()["data"][0]
    assert "Hello there" in entry["request"]
    assert entry["response"] == answer.text
    assert entry["outcome"] == "ok"
    assert other.status_code == 404  # another tenant's logs do not exist for globex
    store = gateway.log_store
    assert isinstance(store, MemoryLogStore)
    assert "plain" not in store.rows  # did not opt in: nothing kept
    (row,) = store.rows["acme"].values()
    assert b"Hello there" not in row.sealed
    assert storage.json()["log_bytes"] == row.size > 0


async def test_a_full_log_quota_skips_logging_and_never_fails_the_request(
    master: MasterKeys,
) -> None:
    gateway, _ = in_process_gateway(config=data_config(**LOGGED, log_quota_bytes=2000))
    async with gateway.running():
        answers = [await _exchange(gateway, KEYS["acme"], CHAT) for _ in range(5)]
        used = await gateway.log_store.used_bytes("acme")
        kept = len(await gateway.log_store.read("acme"))
    assert [a.status_code for a in answers] == [200] * 5
    assert 0 < kept < 5
    assert used <= 2000


async def test_retention_purges_only_expired_rows() -> None:
    store = MemoryLogStore()
    ring_keys = await _ring(store).keys("a")
    assert ring_keys is not None
    from tenantware.logbook import LoggedExchange, seal_row

    for n, ts in enumerate((1000.0, 2000.0)):
        exchange = LoggedExchange(
            request_id=f"r{n}", ts=ts, path="/", model="m", status=200, outcome="ok",
            request=b"q", response=b"a",
        )  # fmt: skip
        await store.append(
            seal_row(ring_keys, exchange, row_id=f"l{n}", retention_s=500), quota_bytes=10**6
        )
    assert await purge_expired(store, ["a"], now=1600.0) == 1
    assert [r.id for r in await store.read("a")] == ["l1"]


async def test_rotation_reseals_every_row_and_resumes_after_an_interruption() -> None:
    from tenantware.crypto import KeyRing
    from tenantware.logbook import LoggedExchange, seal_row

    store = MemoryLogStore()
    old = new_master(1)
    keys = await KeyRing(StaticKeyProvider(old), store).keys("a")
    assert keys is not None
    for n in range(7):
        exchange = LoggedExchange(
            request_id=f"r{n}", ts=float(n), path="/", model="m", status=200, outcome="ok",
            request=f"q{n}".encode(), response=b"a",
        )  # fmt: skip
        await store.append(
            seal_row(keys, exchange, row_id=f"l{n}", retention_s=1e6), quota_bytes=10**6
        )
    rotated = KeyRing(StaticKeyProvider(MasterKeys({**old.keys, 2: os.urandom(32)})), store)
    # An interrupted run: one batch of 3 done.
    first = await rotated.keys("a")
    assert first is not None
    part = await store.stale("a", 2, 3)
    await store.reseal(
        [row.__replace__(sealed=first.seal(first.open(row.sealed)), key_version=2) for row in part]
    )  # type: ignore[attr-defined]
    assert await rotate(store, rotated, ["a"], batch=2) == 4
    assert await rotate(store, rotated, ["a"]) == 0
    retired = await KeyRing(StaticKeyProvider(MasterKeys({2: rotated_key(rotated)})), store).keys(
        "a"
    )
    assert retired is not None
    opened = sorted(open_row(retired, row).request for row in await store.read("a"))
    assert opened == [f"q{n}".encode() for n in range(7)]


def rotated_key(ring: Any) -> bytes:
    assert ring._master is not None
    key: bytes = ring._master.keys[2]
    return key


def _ring(store: MemoryLogStore) -> Any:
    from tenantware.crypto import KeyRing

    return KeyRing(StaticKeyProvider(new_master(1)), store)


async def test_deleting_a_tenant_shreds_its_keys_so_copies_of_its_logs_stay_unreadable(
    master: MasterKeys,
) -> None:
    gateway, _ = in_process_gateway(config=data_config(**LOGGED))
    app = gateway.asgi_app()
    async with gateway.running():
        await _exchange(gateway, KEYS["acme"], CHAT)
        await _exchange(gateway, KEYS["globex"], CHAT)
        store = gateway.log_store
        assert isinstance(store, MemoryLogStore)
        backup = list(store.rows["acme"].values())  # a copy taken with database access
        async with client_for(app, ADMIN) as admin:
            deleted = await admin.delete("/admin/tenants/acme")
            globex_logs = await admin.get("/admin/tenants/globex/logs")
    assert deleted.status_code == 200
    assert "acme" not in store.salts
    assert store.rows.get("acme") is None
    assert len(globex_logs.json()["data"]) == 1  # the other tenant keeps its logs
    from tenantware.crypto import KeyRing

    # Even with the master key and the database: a new derivation for "acme" has a new salt.
    again = await KeyRing(StaticKeyProvider(master), store).keys("acme")
    assert again is not None
    for row in backup:
        with pytest.raises(Undecryptable):
            open_row(again, row)


def test_cli_rotates_every_tenants_logs_to_the_newest_master_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tenantware.cli import main
    from tenantware.crypto import KeyRing
    from tenantware.logbook import LoggedExchange, seal_row
    from tenantware.logbook.sqlite import SqliteLogStore

    old = new_master(1)
    path = tmp_path / "gateway.json"
    path.write_text(
        json.dumps(
            {
                "data": {"master_key_env": "TW_ROTATE_TEST_KEY"},
                "metering": {"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"},
                "tenants": [{"id": "a"}, {"id": "b"}],
            }
        )
    )

    async def fill() -> None:
        store = SqliteLogStore(tmp_path / "ledger.db")
        ring = KeyRing(StaticKeyProvider(old), store)
        for tenant in ("a", "b"):
            keys = await ring.keys(tenant)
            assert keys is not None
            for n in range(3):
                exchange = LoggedExchange(
                    request_id="r", ts=float(n), path="/", model="m", status=200,
                    outcome="ok", request=b"q", response=b"a",
                )  # fmt: skip
                row = seal_row(keys, exchange, row_id=f"l{n}", retention_s=1e9)
                await store.append(row, quota_bytes=10**6)
        await store.aclose()

    anyio.run(fill)
    assert main(["data", "new-master-key"]) == 0
    new_key = capsys.readouterr().out.strip()
    monkeypatch.setenv("TW_ROTATE_TEST_KEY", master_text(old) + f",2:{new_key}")
    assert main(["data", "rotate", "--config", str(path), "--batch", "2"]) == 0
    assert "re-sealed 6 request log rows under master key version 2" in capsys.readouterr().out
    assert main(["data", "rotate", "--config", str(path)]) == 0
    assert "re-sealed 0" in capsys.readouterr().out

    async def versions() -> set[int]:
        store = SqliteLogStore(tmp_path / "ledger.db")
        try:
            return {row.key_version for t in ("a", "b") for row in await store.read(t)}
        finally:
            await store.aclose()

    assert anyio.run(versions) == {2}


async def test_reading_logs_without_a_master_key_is_a_503_and_a_never_keyed_tenant_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MASTER_ENV, raising=False)
    gateway, _ = in_process_gateway(config=data_config(**LOGGED))
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        never_keyed = await admin.get("/admin/tenants/acme/logs")
        await gateway.log_store.create_salt("acme", os.urandom(32))
        keyed = await admin.get("/admin/tenants/acme/logs")
    assert never_keyed.status_code == 200
    assert never_keyed.json()["data"] == []
    assert keyed.status_code == 503
    assert keyed.json()["error"]["code"] == "master_key_missing"
