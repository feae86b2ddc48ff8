"""The proofs of prepaid balances across processes: real Redis, one shared PostgreSQL ledger.

- 1,000 concurrent requests from 4 processes against a balance worth 100 requests: exactly
  100 are served, and the final balance is the initial one minus the ledger's billed total,
  to the nano-dollar (and equals the journal's sum).
- 100 concurrent retries of one top-up across 2 processes credit once; so do 100 concurrent
  redemptions of one code (by two tenants) and 100 deliveries of one payment event.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from tenantware.backends.redis_support import connect_redis
from tenantware.balances import Balances, HmacTestProvider
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.quota import RedisQuotaStore
from tests.balance_worker import PAY_SECRET_ENV, REQUEST_NANOUSD, Job, run_workers

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PAY_SECRET = "whsec-proof"


class Shared:
    """The parent's view of the shared state: the Redis balances and the PostgreSQL ledger."""

    def __init__(self, redis_url: str, prefix: str, postgres_url: str, schema: str) -> None:
        self.redis_url = redis_url
        self.ledger_url = f"{postgres_url}?schema={schema}"
        self.client = connect_redis(redis_url, timeout_s=5.0)
        self.store = RedisQuotaStore(self.client, prefix=prefix)
        self.ledger = PostgresLedger(postgres_url, schema=schema)
        self.balances = Balances(self.store, self.ledger)

    def jobs(self, mode: str, count: int, each: int, **payload: Any) -> list[Job]:
        job = Job(
            redis_url=self.redis_url,
            prefix=self.store.prefix,
            ledger_url=self.ledger_url,
            mode=mode,
            requests=each,
            payload=payload,
        )
        return [job] * count


@pytest.fixture
async def shared(
    redis_url: str, redis_prefix: str, postgres_url: str, postgres_schema: str
) -> AsyncIterator[Shared]:
    state = Shared(redis_url, redis_prefix, postgres_url, postgres_schema)
    await state.ledger.open()
    yield state
    await state.ledger.aclose()
    await state.client.aclose()


def _env() -> dict[str, str]:
    return {**os.environ, PAY_SECRET_ENV: PAY_SECRET}


async def test_a_balance_worth_100_requests_serves_exactly_100(shared: Shared) -> None:
    initial = 100 * REQUEST_NANOUSD + REQUEST_NANOUSD // 2
    await shared.balances.credit(
        tenant_id="buyer",
        kind="topup",
        amount_nanousd=initial,
        reference="proof-initial",
        fingerprint="",
        actor="test",
    )
    reports = await anyio.to_thread.run_sync(run_workers, shared.jobs("spend", 4, 250), _env())
    calls = [call for report in reports for call in report.calls]
    assert Counter(status for _, status, _ in calls) == {200: 100, 429: 900}
    refusals = {json.loads(body)["error"]["code"] for _, status, body in calls if status == 429}
    assert refusals == {"insufficient_quota"}
    records = [r for r in await shared.ledger.query(tenant="buyer") if r.outcome == "ok"]
    assert len(records) == 100
    billed = sum(r.charged_nanousd for r in records)
    final = await shared.store.balance("buyer")
    assert final == initial - billed == REQUEST_NANOUSD // 2
    assert (await shared.ledger.totals())["buyer"] == final
    assert all(check.ok for check in await shared.balances.verify())


async def test_credits_retried_100_times_across_2_processes_apply_once(shared: Shared) -> None:
    _, codes = await shared.balances.create_codes(1, 3_000_000_000, actor="test")
    event = {"id": "evt_42", "type": "payment.succeeded", "tenant": "buyer", "amount_usd": "7"}
    body = json.dumps(event)
    signature = HmacTestProvider(PAY_SECRET.encode()).sign(body.encode(), at=time.time())
    jobs = shared.jobs(
        "credits",
        2,
        50,
        body={"amount_usd": "12.5", "note": "order 9"},
        key="order-9",
        code=codes[0],
        event=body,
        signature=signature,
    )
    reports = await anyio.to_thread.run_sync(run_workers, jobs, _env())
    calls = [call for report in reports for call in report.calls]
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for kind, status, text in calls:
        by_kind.setdefault(kind, []).append((status, text))
    # The top-up: 100 answers, all the same 201.
    assert {status for status, _ in by_kind["topup"]} == {201}
    assert len({text for _, text in by_kind["topup"]}) == 1
    # The payment event: 100 deliveries, all the same 200.
    assert {status for status, _ in by_kind["payment"]} == {200}
    assert len({text for _, text in by_kind["payment"]}) == 1
    # The code: one tenant won (its retries all 201, the same), the other was refused.
    won = [text for status, text in by_kind["redeem"] if status == 201]
    assert len(set(won)) == 1
    assert {status for status, _ in by_kind["redeem"]} == {201, 409}
    winner = json.loads(won[0])["tenant"]
    code_value = 3_000_000_000
    expected = {"buyer": 12_500_000_000 + 7_000_000_000}
    expected[winner] = expected.get(winner, 0) + code_value
    assert await shared.ledger.totals() == expected
    for tenant, total in expected.items():
        assert await shared.store.balance(tenant) == total
    kinds = Counter(e.kind for e in await shared.ledger.entries("buyer"))
    assert kinds["topup"] == kinds["payment"] == 1
