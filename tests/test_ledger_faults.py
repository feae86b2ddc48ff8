"""Ledger faults: a record a ledger cannot store is set aside (dead-letter file) and never
blocks the records after it, in the writer and in the spill replay, on SQLite and PostgreSQL;
a ledger that stays stuck is reported on /readyz, in a metric and in a log line that repeats
at a bounded rate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import msgspec
import pytest
import structlog

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.metering.ledger import (
    DeadLetterFile,
    Ledger,
    LedgerUnavailable,
    LedgerWriter,
    MemoryLedger,
    SpillFile,
    SqliteLedger,
    UsageRecord,
    dead_letter_path,
    encode_record,
)
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.metrics import REGISTRY
from tenantware.testing.upstream import FakeUpstream
from tests.servers import find_free_port
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config
from tests.test_ledger import make_records

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    backend: Ledger
    if request.param == "sqlite":
        backend = SqliteLedger(tmp_path / "ledger.db")
    else:
        url = request.getfixturevalue("postgres_url")
        schema = request.getfixturevalue("postgres_schema")
        backend = PostgresLedger(url, schema=schema)
    await backend.open()
    yield backend
    await backend.aclose()


def _unstorable(record: UsageRecord, fault: str = "overflow") -> UsageRecord:
    """A record a SQL ledger refuses: a token count beyond 64-bit integers, or (PostgreSQL
    only: its text cannot hold it) a NUL character."""
    if fault == "nul":
        return msgspec.structs.replace(
            record, record_id=record.record_id + "-nul", model_served="gpt\x00-4.1"
        )
    return msgspec.structs.replace(
        record, record_id=record.record_id + "-bad", output_tokens=10**20
    )


async def test_a_record_the_ledger_refuses_is_set_aside_and_the_writer_goes_on(
    sql_ledger: Ledger, tmp_path: Path
) -> None:
    spill = SpillFile(tmp_path / "usage.spill.jsonl")
    writer = LedgerWriter(sql_ledger, spill=spill, batch_size=100)
    good = make_records(9)
    bad = [_unstorable(good[0])]
    if isinstance(sql_ledger, PostgresLedger):
        bad.append(_unstorable(good[1], "nul"))
    for record in [*good[:4], *bad, *good[4:]]:
        writer.submit(record)
    await writer.flush()
    later = make_records(3, start=5_000.0)
    for record in later:
        writer.submit(record)
    await writer.flush()
    stored = await sql_ledger.query()
    assert {r.record_id for r in stored} == {r.record_id for r in good + later}
    assert writer.pending == 0
    assert writer.stats.dead_lettered == len(bad)
    assert writer.dead_letter is not None
    assert writer.dead_letter.path == tmp_path / "usage.dead.jsonl"
    letters = writer.dead_letter.read()
    assert [letter.record for letter in letters] == bad
    assert "range" in letters[0].reason.lower() or "overflow" in letters[0].reason.lower()
    assert writer.health().stuck is False


async def test_the_spill_replay_sets_aside_what_the_ledger_refuses(
    sql_ledger: Ledger, tmp_path: Path
) -> None:
    spill = SpillFile(tmp_path / "usage.spill.jsonl")
    good = make_records(5)
    bad = _unstorable(good[0])
    # As an older gateway could have spilled them, plus a line that is not a record at all.
    spill.append([good[0], bad, *good[1:]])
    with spill.path.open("ab") as file:
        file.write(b'{"not": "a record"}\n')
    dead = DeadLetterFile(tmp_path / "refused.jsonl")
    writer = LedgerWriter(sql_ledger, spill=spill, dead_letter=dead)
    await writer.flush()
    assert {r.record_id for r in await sql_ledger.query()} == {r.record_id for r in good}
    assert not spill.has_records()
    letters = dead.read()
    assert [letter.record for letter in letters if letter.record is not None] == [bad]
    assert [letter.line for letter in letters if letter.line is not None] == ['{"not": "a record"}']


def test_dead_letter_lines_are_json_with_the_reason(tmp_path: Path) -> None:
    dead = DeadLetterFile(tmp_path / "x.jsonl")
    from tenantware.metering.ledger.deadletter import letters_for

    record = make_records(1)[0]
    dead.append(letters_for([record], "OverflowError('too big')", [b"\xff\xfe"]))
    first, second = (json.loads(line) for line in dead.path.read_bytes().splitlines())
    assert first["reason"] == "OverflowError('too big')"
    assert first["record"] == json.loads(encode_record(record))
    assert second["line"] == "\\xff\\xfe"
    assert dead_letter_path(Path("/a/usage.db.spill.jsonl")) == Path("/a/usage.db.dead.jsonl")
    assert dead_letter_path(Path("/a/spill.jsonl")) == Path("/a/spill.dead.jsonl")


class _DownLedger(MemoryLedger):
    """A ledger that refuses every write while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def write(self, records: Sequence[UsageRecord]) -> None:
        if self.down:
            raise LedgerUnavailable("connection refused")
        await super().write(records)


def _stuck_gauge() -> float | None:
    return REGISTRY.get_sample_value("tenantware_ledger_stuck")


async def test_a_stuck_ledger_is_logged_at_a_bounded_rate_until_it_recovers() -> None:
    now = [0.0]
    ledger = _DownLedger()
    writer = LedgerWriter(
        ledger,
        flush_interval_s=1.0,
        retry_backoff_s=1.0,
        stuck_after_s=5.0,
        stuck_log_interval_s=30.0,
        clock=lambda: now[0],
    )
    with structlog.testing.capture_logs() as logs:
        # Nothing waits for the ledger yet: down, but not stuck.
        await writer.flush()
        assert not writer.watch_health().stuck
        for record in make_records(50):
            writer.submit(record)
        for second in range(120):  # two minutes of flushes, one a second
            now[0] = float(second)
            writer.submit(make_records(1, start=10_000.0 + second)[0])
            await writer.flush()
            health = writer.watch_health()
            assert health.stuck == (second >= 5)  # the first failure was at t=0
        assert _stuck_gauge() == 1.0
        assert health.ledger == "_down"
        assert health.error == "LedgerUnavailable"  # the type only: a message may hold a DSN
        ledger.down = False
        now[0] = 121.0
        await writer.flush()
        recovered = writer.watch_health()
    stuck_lines = [entry for entry in logs if entry["event"] == "usage ledger stuck"]
    # Stuck from t=5 to t=119: logged at 5, 35, 65 and 95. Not once, not per flush or record.
    assert len(stuck_lines) == 4
    assert all(line["pending"] > 0 for line in stuck_lines)
    assert any(entry["event"] == "usage ledger no longer stuck" for entry in logs)
    assert not recovered.stuck
    assert recovered.pending == 0
    assert _stuck_gauge() == 0.0
    assert len(ledger.records) == 50 + 120


async def test_readyz_names_the_stuck_ledger_and_is_503_when_it_cannot_spill(
    tmp_path: Path,
) -> None:
    healthy, _ = in_process_gateway()
    async with healthy.running(), client_for(healthy.asgi_app()) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["ledger"]["stuck"] is False

    dead = f"postgresql://tw:secret-password@127.0.0.1:{find_free_port()}/none"
    # Stuck with nowhere to spill (the spill file's directory is a file): records would be
    # lost, so the replica is not ready (with a spill file it is: tests/test_health.py).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = make_config(
        metering={"spill_path": str(blocker / "spill.jsonl"), "request_log": False}
    )
    gateway = Gateway(
        config,
        upstream_client=HttpxUpstreamClient(transport=httpx.ASGITransport(app=FakeUpstream())),
        ledger=PostgresLedger(dead, timeout_s=0.2),
    )
    assert gateway.writer is not None
    gateway.writer.stuck_after_s = 0.0  # no waiting in a test: stuck at the first failure
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await gateway.writer.flush()
        gateway.writer.watch_health()
        stuck = await client.get("/readyz", headers={"authorization": ""})
        metrics = _stuck_gauge()
        gateway.writer.spill = None  # leaving running() would spill into the blocked path
    assert stuck.status_code == 503
    body = stuck.json()
    assert body["status"] == "not_ready"
    assert body["ledger"]["ledger"] == "postgres"
    assert body["ledger"]["stuck"] is True
    assert body["ledger"]["pending"] >= 1
    assert "secret-password" not in stuck.text
    assert metrics == 1.0
