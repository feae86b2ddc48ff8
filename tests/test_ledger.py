"""The ledger suite, run against every backend (memory, SQLite, PostgreSQL), and the writer:
batching, flush on shutdown, spilling while PostgreSQL is down and replaying without duplicates."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.metering.ledger import (
    Ledger,
    LedgerUnavailable,
    LedgerWriter,
    MemoryLedger,
    SpillFile,
    SqliteLedger,
    UsageRecord,
    open_ledger,
)
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.testing.upstream import FakeUpstream
from tests.metering_support import wait_for
from tests.servers import (
    PostgresServer,
    ServiceUnavailable,
    find_free_port,
    throwaway_postgres,
)
from tests.support import CHAT, KEYS, client_for, make_config

pytestmark = pytest.mark.anyio


def make_records(n: int, *, tenant: str = "acme", start: float = 1_000.0) -> list[UsageRecord]:
    return [
        UsageRecord(
            record_id=f"{tenant}-{start}-{i}",
            request_id=f"req-{i}",
            ts=start + i,
            tenant=tenant,
            cost_center="cc",
            key_id="k1",
            model_requested="gpt-4.1",
            model_served="gpt-4.1",
            upstream="fake",
            status=200,
            outcome="ok",
            input_tokens=10 + i,
            output_tokens=i,
            cached_tokens=i % 3,
            reasoning_tokens=0,
            cost_nanousd=1_000_000_007 * (i + 1),
            charged_nanousd=1_000_000_007 * (i + 1),
            queue_wait_s=0.25,
            upstream_latency_s=None if i % 2 else 0.5,
            latency_s=0.75,
            ttft_s=0.125 if i % 2 else None,
            stream=bool(i % 2),
            estimated=i % 5 == 0,
        )
        for i in range(n)
    ]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    backend: Ledger
    if request.param == "memory":
        backend = MemoryLedger()
    elif request.param == "sqlite":
        backend = SqliteLedger(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("postgres_schema")
        backend = PostgresLedger(url, schema=schema)
    await backend.open()
    yield backend
    await backend.aclose()


async def test_records_round_trip_exactly(ledger: Ledger) -> None:
    records = make_records(7)
    await ledger.write(records)
    assert await ledger.query() == records


async def test_writes_are_idempotent_on_record_id(ledger: Ledger) -> None:
    records = make_records(5)
    await ledger.write(records)
    await ledger.write(records[2:])
    await ledger.write([*records, *make_records(2, start=5_000.0)])
    stored = await ledger.query()
    assert len(stored) == 7
    assert len({r.record_id for r in stored}) == 7


async def test_query_filters_by_tenant_and_time(ledger: Ledger) -> None:
    await ledger.write(make_records(10) + make_records(10, tenant="hobby"))
    acme = await ledger.query(tenant="acme", since=1_003.0, until=1_006.0)
    assert [r.ts for r in acme] == [1_003.0, 1_004.0, 1_005.0]
    assert {r.tenant for r in acme} == {"acme"}
    assert len(await ledger.query(since=1_008.0)) == 4


async def test_schema_creation_is_repeatable(ledger: Ledger) -> None:
    await ledger.write(make_records(3))
    await ledger.open()
    await ledger.open()
    assert len(await ledger.query()) == 3


async def test_writer_batches_and_flushes_everything_on_exit(ledger: Ledger) -> None:
    writer = LedgerWriter(ledger, flush_interval_s=0.05, batch_size=400)
    records = make_records(1_500)
    async with writer.running():
        for record in records[:700]:
            writer.submit(record)
        await wait_for(lambda: writer.stats.written == 700)
        for record in records[700:]:
            writer.submit(record)
    assert writer.stats.written == 1_500
    assert writer.pending == 0
    await ledger.open()  # running() closed it; reopen to read back
    assert len(await ledger.query()) == 1_500


async def test_sqlite_records_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "usage.db"
    first = open_ledger(f"sqlite:///{path}")
    await first.open()
    await first.write(make_records(4))
    await first.aclose()
    second = SqliteLedger(path)
    assert len(await second.query()) == 4
    await second.aclose()


def test_ledger_urls() -> None:
    assert isinstance(open_ledger("memory://"), MemoryLedger)
    sqlite = open_ledger("sqlite:////tmp/x/usage.db")
    assert isinstance(sqlite, SqliteLedger)
    assert sqlite.path == Path("/tmp/x/usage.db")
    pg = open_ledger("postgresql://u@127.0.0.1:5432/db?schema=billing&sslmode=disable")
    assert isinstance(pg, PostgresLedger)
    assert pg.url == "postgresql://u@127.0.0.1:5432/db?sslmode=disable"
    with pytest.raises(ValueError, match="unsupported"):
        open_ledger("mysql://x")


def test_spill_file_skips_a_torn_last_line(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append(make_records(3))
    with spill.path.open("ab") as file:
        file.write(b'{"record_id":"torn')
    assert [r.record_id for r in spill.read()] == [r.record_id for r in make_records(3)]


# -- PostgreSQL outage ------------------------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    try:
        with throwaway_postgres() as server:
            yield server
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway PostgreSQL: {exc.reason}")


@pytest.mark.slow
async def test_postgres_outage_buffers_spills_and_replays_without_loss_or_duplicates(
    private_postgres: PostgresServer, tmp_path: Path
) -> None:
    ledger = PostgresLedger(private_postgres.url, timeout_s=1.0)
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = LedgerWriter(
        ledger,
        flush_interval_s=0.05,
        batch_size=100,
        max_buffered=50,
        spill=spill,
        retry_backoff_s=0.2,
    )
    before, during, after = (
        make_records(100),
        make_records(300, start=2e6),
        make_records(50, start=3e6),
    )
    async with writer.running():
        for record in before:
            writer.submit(record)
        await wait_for(lambda: writer.stats.written == 100)
        await anyio.to_thread.run_sync(private_postgres.stop)
        for record in during:
            writer.submit(record)
        await wait_for(lambda: writer.stats.spilled >= 250, timeout=20)
        assert writer.stats.failures > 0
        with pytest.raises(LedgerUnavailable):
            await ledger.query()
        await anyio.to_thread.run_sync(private_postgres.start)
        # A crash between a replay and the truncation replays records already stored:
        spill.append(before[:30])
        for record in after:
            writer.submit(record)
        await wait_for(lambda: writer.pending == 0 and not spill.has_records(), timeout=20)
        stored = await ledger.query()
    assert len(stored) == 450
    assert {r.record_id for r in stored} == {r.record_id for r in before + during + after}


async def test_request_path_never_waits_on_an_unreachable_ledger(tmp_path: Path) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{find_free_port()}/none"
    spill_path = tmp_path / "spill.jsonl"
    config = make_config(
        metering={"ledger_url": dead, "spill_path": str(spill_path), "request_log": False}
    )
    fake = FakeUpstream()
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    gateway = Gateway(config, upstream_client=client, ledger=PostgresLedger(dead, timeout_s=1.0))
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as http:
        started = time.perf_counter()
        for _ in range(20):
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
        elapsed = time.perf_counter() - started
    # Waiting on the ledger's 1 s connect timeout would take >= 20 s; shutdown spills all.
    assert elapsed < 5.0
    assert len(SpillFile(spill_path).read()) == 20


async def test_records_are_published_to_a_redis_stream(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from tenantware.metering.ledger import RedisStreamPublisher, decode_record

    client = aioredis.Redis.from_url(redis_url)
    stream = redis_prefix + "usage"
    writer = LedgerWriter(
        MemoryLedger(), flush_interval_s=0.05, publisher=RedisStreamPublisher(client, stream)
    )
    records = make_records(25)
    try:
        async with writer.running():
            for record in records:
                writer.submit(record)
        entries = await client.xrange(stream)
    finally:
        await client.aclose()
    assert [decode_record(fields[b"record"]) for _, fields in entries] == records
    assert {fields[b"tenant"] for _, fields in entries} == {b"acme"}


async def test_gateway_publishes_to_the_configured_stream(
    redis_url: str, redis_prefix: str
) -> None:
    import redis.asyncio as aioredis

    config = make_config(
        gateway={"redis_url": redis_url, "redis_prefix": redis_prefix},
        metering={"ledger_url": "memory://", "redis_stream": "usage", "request_log": False},
    )
    fake = FakeUpstream()
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    gateway = Gateway(config, upstream_client=client)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    reader = aioredis.Redis.from_url(redis_url)
    try:
        entries = await reader.xrange(redis_prefix + "usage")
    finally:
        await reader.aclose()
    assert len(entries) == 1
    assert response.headers["x-request-id"].encode() in entries[0][1][b"record"]


async def test_an_unwritable_spill_file_keeps_records_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    dead = f"postgresql://postgres@127.0.0.1:{find_free_port()}/none"
    writer = LedgerWriter(
        PostgresLedger(dead, timeout_s=0.5),
        flush_interval_s=0.02,
        max_buffered=5,
        spill=SpillFile(blocker / "spill.jsonl"),
        retry_backoff_s=60,
    )
    async with writer.running():
        for record in make_records(20):
            writer.submit(record)
        await wait_for(lambda: writer.stats.failures > 0 and writer.pending == 20)
        await anyio.sleep(0.1)  # several flush ticks: the loop survives the spill errors
        assert writer.pending == 20
    assert writer.stats.spilled == 0


async def test_replicas_share_one_postgres_ledger(postgres_url: str, postgres_schema: str) -> None:
    """Several gateway processes start together (migrations under an advisory lock) and
    write to one ledger; a record written by two of them is stored once."""
    ledgers = [PostgresLedger(postgres_url, schema=postgres_schema) for _ in range(3)]
    shared = make_records(10, tenant="shared")
    async with anyio.create_task_group() as group:
        for ledger in ledgers:
            group.start_soon(ledger.open)
    async with anyio.create_task_group() as group:
        for n, ledger in enumerate(ledgers):
            group.start_soon(ledger.write, make_records(50, tenant=f"r{n}") + shared)
    stored = await ledgers[0].query()
    for ledger in ledgers:
        await ledger.aclose()
    assert len(stored) == 160
    assert sum(1 for r in stored if r.tenant == "shared") == 10


async def test_observers_see_a_big_batch_in_slices_with_the_event_loop_running_between() -> None:
    """Metrics and log lines of 200 records must not hold the loop for the whole batch."""
    ticks = 0
    seen: list[tuple[int, int]] = []  # (slice size, loop ticks so far)

    def observer(records: Sequence[UsageRecord]) -> None:
        seen.append((len(records), ticks))

    writer = LedgerWriter(MemoryLedger(), flush_interval_s=60, observers=[observer])
    for record in make_records(200):
        writer.submit(record)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await writer.flush()
        group.cancel_scope.cancel()
    assert sum(size for size, _ in seen) == 200
    assert max(size for size, _ in seen) <= 16
    # Other tasks ran between every two slices.
    assert all(later > earlier for (_, earlier), (_, later) in itertools.pairwise(seen))


async def test_a_spill_file_another_process_left_is_looked_for_once_a_second(
    tmp_path: Path,
) -> None:
    """The flush looks on disk for a spill file it did not write at most once a second (not
    one thread hop per flush), and replays what it finds there."""
    now = [0.0]
    spill = SpillFile(tmp_path / "spill.jsonl")
    looks = 0
    has_records = spill.has_records

    def counted() -> bool:
        nonlocal looks
        looks += 1
        return has_records()

    spill.has_records = counted  # type: ignore[method-assign]
    ledger = MemoryLedger()
    writer = LedgerWriter(ledger, spill=spill, clock=lambda: now[0])
    for _ in range(5):
        await writer.flush()
    assert looks == 1
    SpillFile(spill.path).append(make_records(3))  # another process spills meanwhile
    now[0] = 0.5
    await writer.flush()
    assert looks == 1
    assert await ledger.query() == []
    now[0] = 1.0
    await writer.flush()
    assert looks == 2
    assert len(await ledger.query()) == 3
    assert not spill.has_records()
