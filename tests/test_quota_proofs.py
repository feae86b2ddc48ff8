"""The quota proofs of issue 4: many processes, Redis Cluster, Redis outages (real servers)."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from decimal import Decimal

import anyio
import pytest
import structlog

from tenantware import Gateway, metrics
from tenantware.backends.redis_support import connect_redis
from tenantware.config import Limits
from tenantware.quota import FailoverQuotaStore, MemoryQuotaStore, RedisQuotaStore, build_plan
from tests.quota_support import NOON, Clock, hammer_process, plan_for
from tests.servers import ServiceUnavailable, redis_cluster, throwaway_redis
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config, tenant_entries

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def test_four_processes_sharing_redis_admit_exactly_the_limit(
    redis_url: str, redis_prefix: str
) -> None:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    start = spawn.Barrier(4)
    workers = [
        spawn.Process(
            target=hammer_process, args=(results, n, redis_url, redis_prefix, NOON, 250, start)
        )
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        counts = [results.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    per_minute, per_hour, token_grants, refunded_grants, actual_tokens = (
        sum(c[i] for c in counts) for i in range(5)
    )
    assert per_minute == 100  # 1,000 requests vs 100/min: not 100 per process
    assert per_hour == 100  # the same with Redis TIME as the clock
    assert token_grants == 100  # 1,000 x 1,000 tokens vs 100,000/min: zero overshoot
    # Refunds were usable at once (more than 100 got in) and nothing overshot.
    assert refunded_grants > 100
    assert actual_tokens <= 100_000

    async def charged() -> list[int]:
        client = connect_redis(redis_url, timeout_s=5.0)
        store = RedisQuotaStore(client, prefix=redis_prefix, clock=Clock(NOON))
        try:
            return await store.usage(plan_for(redis_prefix, tenant="fourth", tokens_per_minute=1))
        finally:
            await client.aclose()

    assert anyio.run(charged) == [actual_tokens]


async def test_one_process_with_the_memory_store_admits_exactly_the_limit() -> None:
    store = MemoryQuotaStore(clock=Clock())
    plan = plan_for(requests_per_minute=100, burst_multiplier=1.0)
    admitted = 0

    async def one(i: int) -> None:
        nonlocal admitted
        await anyio.sleep(0)
        admitted += (await store.reserve(plan, 0, 0, str(i))).allowed

    async with anyio.create_task_group() as group:
        for i in range(1_000):
            group.start_soon(one, i)
    assert admitted == 100


async def test_concurrent_http_requests_through_the_gateway_admit_exactly_the_limit() -> None:
    tenants = tenant_entries()
    tenants[0].update(tier="plain", limits={"requests_per_hour": 40, "daily_budget_usd": "1"})
    gateway, fake = in_process_gateway(config=make_config(tenants=tenants, tiers={"plain": {}}))
    codes: list[int] = []
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:

        async def one() -> None:
            codes.append((await client.post("/v1/chat/completions", json=CHAT)).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(150):
                group.start_soon(one)
    assert codes.count(200) == 40
    assert codes.count(429) == 110
    assert fake.stats.requests == 40


async def test_redis_cluster_of_three_masters_runs_every_script_without_crossslot() -> None:
    with contextlib.ExitStack() as stack:
        try:
            urls = stack.enter_context(redis_cluster(3))
        except ServiceUnavailable as exc:
            pytest.skip(f"no Redis Cluster: {exc.reason}")
        url = "redis+cluster://" + urls[0].removeprefix("redis://")
        client = connect_redis(url, timeout_s=5.0)
        try:
            store = RedisQuotaStore(client, prefix="c:")
            config = make_config(quota={"model_limits": {"gpt-4.1": {"tokens_per_minute": 5_000}}})
            limits = Limits(
                requests_per_minute=3,
                tokens_per_minute=10_000,
                concurrent_requests=5,
                daily_budget_usd=Decimal("1"),
                monthly_budget_usd=Decimal("10"),
            )
            slots = set()
            for n in range(8):
                tenant = f"tenant-{n}"
                plan, _ = build_plan(config, tenant, limits, "gpt-4.1", "c:")
                assert plan is not None
                slots.add(await client.cluster_keyslot(plan.keys[0]))
                decisions = [await store.reserve(plan, 1_000, 5_000, f"t{i}") for i in range(4)]
                assert [d.allowed for d in decisions] == [True, True, True, False]
                for i, decision in enumerate(decisions[:3]):
                    await store.settle(plan, decision.now_us, f"t{i}", -500, -1_000)
                assert await store.usage(plan) == [3, 1_500, 0, 12_000, 12_000, 1_500]
            assert len(slots) > 1  # the tenants really are spread over the masters
            # Slot leases of tenants on every master are renewed (one call per hash slot).
            for n in range(8):
                plan, _ = build_plan(config, f"holder-{n}", limits, "gpt-4.1", "c:")
                assert plan is not None
                assert (await store.reserve(plan, 1, 1, "held")).allowed
            assert await store.renew() == 8
        finally:
            await client.aclose()

        gateway_config = make_config(
            gateway={"redis_url": url, "redis_prefix": "g:", "redis_timeout_s": 2.0},
            quota={"global_limits": {"requests_per_minute": 100}},
        )
        gateway, _ = in_process_gateway(config=gateway_config)
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as http:
                response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "6000"
            assert isinstance(gateway.quota_store, FailoverQuotaStore)
            assert gateway.quota_store.available
        finally:
            await gateway.aclose()


@pytest.fixture
def private_redis() -> Iterator[object]:
    try:
        with throwaway_redis() as server:
            yield server
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway Redis: {exc.reason}")


def _policy_config(url: str) -> Gateway:
    tenants = tenant_entries()
    tenants[0].update(tier="plain", limits={"requests_per_minute": 10, "daily_budget_usd": "5"})
    tenants[1].update(tier="plain", limits={"concurrent_requests": 10})
    config = make_config(
        tenants=tenants,
        tiers={"plain": {}},
        gateway={"redis_url": url, "redis_timeout_s": 0.05, "replicas": 2},
        quota={
            "on_store_failure": {"requests": "local", "budget": "open", "concurrency": "closed"},
            "retry_store_after_s": 0.2,
        },
    )
    return Gateway(config)


async def test_redis_outage_is_answered_within_the_timeout_under_each_policy(
    private_redis: object,
) -> None:
    from tests.servers import RedisServer

    server = private_redis
    assert isinstance(server, RedisServer)
    gateway = _policy_config(server.url)
    store = gateway.quota_store
    assert isinstance(store, FailoverQuotaStore)
    config = gateway.config
    acme, _ = build_plan(
        config, "acme", Limits(requests_per_minute=10, daily_budget_usd=Decimal("5")), None, ""
    )
    hobby, _ = build_plan(config, "hobby", Limits(concurrent_requests=10), None, "")
    open_plan, _ = build_plan(config, "x", Limits(daily_budget_usd=Decimal("0")), None, "")
    assert acme is not None
    assert hobby is not None
    assert open_plan is not None

    def local_failures() -> float:
        labels = {"layer": "quota", "policy": "local"}
        return metrics.REGISTRY.get_sample_value("tenantware_store_failures_total", labels) or 0.0

    before = local_failures()
    logs = contextlib.ExitStack()
    captured = logs.enter_context(structlog.testing.capture_logs())
    try:
        assert (await store.reserve(acme, 0, 10, "a")).source == "store"

        for outage in ("stop", "pause"):
            getattr(server, outage)()
            slowest = 0.0
            local = []
            for i in range(8):
                started = time.monotonic()
                local.append(await store.reserve(acme, 0, 10, f"l{i}"))
                slowest = max(slowest, time.monotonic() - started)
            started = time.monotonic()
            closed = await store.reserve(hobby, 0, 0, "c")
            opened = await store.reserve(open_plan, 0, 10, "o")
            slowest = max(slowest, (time.monotonic() - started) / 2)
            # Each answer within the 50 ms timeout (a generous margin for a loaded machine);
            # after the first failure the store is left alone.
            assert slowest < 0.5, outage
            assert {d.source for d in local} == {"local"}
            assert opened.source == "open"
            assert opened.allowed
            # requests: local limiter at 10 / 2 replicas per minute, budget open.
            assert sum(d.allowed for d in local) <= 5
            assert closed.source == "closed"
            assert not closed.allowed
            if outage == "stop":
                server.start()
            else:
                server.resume()
            await anyio.sleep(0.3)
            recovered = await store.reserve(hobby, 0, 0, f"r-{outage}")
            assert recovered.source == "store", outage
            assert recovered.allowed
        assert local_failures() > before

        # Through the middleware: a closed limit answers 503 at once during an outage.
        server.stop()
        async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
            started = time.monotonic()
            chat = {**CHAT, "model": "gemini-2.5-flash"}
            response = await client.post("/v1/chat/completions", json=chat)
            assert time.monotonic() - started < 1.0
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "quota_unavailable"
        assert response.headers["x-should-retry"] == "true"
        events = [entry for entry in captured if entry.get("log_level") == "warning"]
        # stop, pause, stop: one warning per outage, naming the policies in force.
        assert len(events) == 3
        assert "requests=local" in events[0]["policies"]
        assert any(entry["event"] == "quota store available again" for entry in captured)
    finally:
        logs.close()
        server.start()
        await gateway.aclose()
