"""Every log store (memory, SQLite, real PostgreSQL): salts, quotas, reads, retention,
rotation support, restore and deletion, one tenant at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenantware.logbook import LogRow, LogStore, MemoryLogStore
from tenantware.logbook.postgres import PostgresLogStore
from tenantware.logbook.sqlite import SqliteLogStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogStore]:
    made: LogStore
    if request.param == "memory":
        made = MemoryLogStore()
    elif request.param == "sqlite":
        made = SqliteLogStore(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        made = PostgresLogStore(url, schema=request.getfixturevalue("postgres_schema"))
    await made.open()
    try:
        yield made
    finally:
        await made.aclose()


def _row(tenant: str, n: int, *, size: int = 10, version: int = 1) -> LogRow:
    return LogRow(
        id=f"l{n:03}", tenant=tenant, ts=float(n), expires_at=100.0 + n, key_version=version,
        sealed=bytes([n % 256]) * size,
    )  # fmt: skip


async def test_salts_first_writer_wins_and_are_destroyed_per_tenant(store: LogStore) -> None:
    assert await store.get_salt("a") is None
    assert await store.create_salt("a", b"1" * 32) == b"1" * 32
    assert await store.create_salt("a", b"2" * 32) == b"1" * 32
    await store.create_salt("b", b"3" * 32)
    assert await store.destroy_salt("a")
    assert not await store.destroy_salt("a")
    assert await store.get_salt("a") is None
    assert await store.get_salt("b") == b"3" * 32


async def test_rows_are_read_newest_first_within_the_tenant_and_its_quota(store: LogStore) -> None:
    for n in range(5):
        assert await store.append(_row("a", n), quota_bytes=35) is (n < 3)
    assert await store.append(_row("b", 0), quota_bytes=35)
    assert [r.id for r in await store.read("a")] == ["l002", "l001", "l000"]
    assert [r.id for r in await store.read("a", since=1.0, until=2.0)] == ["l001"]
    assert [r.id for r in await store.read("a", limit=1)] == ["l002"]
    assert await store.used_bytes("a") == 30
    assert [r.tenant for r in await store.read("b")] == ["b"]


async def test_retention_rotation_restore_and_deletion(store: LogStore) -> None:
    for n in range(4):
        await store.append(_row("a", n), quota_bytes=10**6)
    await store.append(_row("b", 0), quota_bytes=10**6)
    assert await store.purge_expired("a", 101.5) == 2
    stale = await store.stale("a", 2, 10)
    assert [r.id for r in stale] == ["l002", "l003"]
    await store.reseal([_row("a", 2, size=12, version=2)])
    assert [r.id for r in await store.stale("a", 2, 10)] == ["l003"]
    assert await store.used_bytes("a") == 22
    assert await store.restore([_row("a", 3), _row("a", 9)]) == 1
    assert await store.delete_tenant("a") == 3
    assert await store.read("a") == []
    assert len(await store.read("b")) == 1
