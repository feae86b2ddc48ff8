"""Cost of the quota layer: one reserve + settle round, memory and Redis, and the middleware.

Run with ``pytest benchmarks/test_bench_quota.py --benchmark-enable``; without the flag (as
in CI) each benchmark runs once as a plain test. Async rounds run ``BATCH`` at a time inside
one event-loop call, so the figure per round is the benchmark's mean divided by ``BATCH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tenantware.backends.redis_support import connect_redis
from tenantware.config import Limits
from tenantware.context import SCOPE_KEY, Outcome, RequestContext, RequestView, Usage
from tenantware.middleware.quota import QuotaMiddleware
from tenantware.quota import MemoryQuotaStore, Plan, RedisQuotaStore, build_plan
from tenantware.registry import MemoryTenantRegistry
from tenantware.state import LiveConfig
from tests.servers import ServiceUnavailable, redis_url_for_tests
from tests.support import make_config

BATCH = 100
LIMITS = Limits(
    requests_per_minute=10**9,
    tokens_per_minute=10**12,
    concurrent_requests=10**6,
    daily_budget_usd=Decimal("1000000"),
    monthly_budget_usd=Decimal("1000000"),
)


def _plan(prefix: str) -> Plan:
    plan, _ = build_plan(make_config(), "acme", LIMITS, None, prefix)
    assert plan is not None
    return plan


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        try:
            yield stack.enter_context(redis_url_for_tests())
        except ServiceUnavailable as exc:
            pytest.skip(f"Redis unavailable: {exc.reason}")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_memory_reserve_settle_round(benchmark: Any) -> None:
    store = MemoryQuotaStore()
    plan = _plan("")

    def round_trip() -> None:
        decision = store.reserve_now(plan, 1_200, 9_600_000, "t")
        store.settle_now(plan, decision.now_us, "t", -200, -1_600_000)

    benchmark(round_trip)
    assert store.reserve_now(plan, 1, 1, "x").allowed


def test_redis_reserve_settle_round(
    benchmark: Any, redis_url: str, loop: asyncio.AbstractEventLoop
) -> None:
    prefix = f"twbench:{uuid.uuid4().hex[:8]}:"
    client = connect_redis(redis_url, timeout_s=5.0)
    store = RedisQuotaStore(client, prefix=prefix)
    plan = _plan(prefix)

    async def batch() -> None:
        for _ in range(BATCH):
            decision = await store.reserve(plan, 1_200, 9_600_000, "t")
            await store.settle(plan, decision.now_us, "t", -200, -1_600_000)

    try:
        benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=10, iterations=1)
    finally:
        loop.run_until_complete(client.delete(*plan.keys))
        loop.run_until_complete(client.aclose())


@pytest.mark.parametrize("billing", ["postpaid", "prepaid"])
def test_middleware_request_with_memory_store(
    benchmark: Any, loop: asyncio.AbstractEventLoop, billing: str
) -> None:
    """One request through QuotaMiddleware (reserve, headers, settle) around a trivial app;
    ``prepaid``: the same limits plus a prepaid balance (with a low-balance threshold)."""
    tenants: list[dict[str, Any]] = [
        {
            "id": "acme",
            "tier": "pro",
            "billing": billing,
            "low_balance_usd": "1",
            "limits": {
                "requests_per_minute": 10**9,
                "tokens_per_minute": 10**12,
                "concurrent_requests": 10**6,
                "daily_budget_usd": "1000000",
            },
        }
    ]
    config = make_config(tenants=tenants)
    live = LiveConfig(config)
    view = MemoryTenantRegistry(config).by_id("acme")
    assert view is not None
    body_view = RequestView(model="gpt-4.1", max_tokens=100)
    start = {"type": "http.response.start", "status": 200, "headers": []}
    end = {"type": "http.response.body", "body": b"{}"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ctx: RequestContext = scope[SCOPE_KEY]
        await send(dict(start))
        await send(end)
        ctx.usage = Usage(input_tokens=20, output_tokens=30)
        ctx.outcome = Outcome.OK

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    store = MemoryQuotaStore()
    loop.run_until_complete(store.credit("acme", "bench", 10**15, 10**9))
    middleware = QuotaMiddleware(app, live=live, store=store)

    async def batch() -> None:
        for _ in range(BATCH):
            ctx = RequestContext("r")
            ctx.tenant = view
            ctx.view = body_view
            ctx.model = "gpt-4.1"
            ctx.estimated_prompt_tokens = 20
            scope = {"type": "http", SCOPE_KEY: ctx}
            await middleware(scope, receive, send)

    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=50, iterations=1)
