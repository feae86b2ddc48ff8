"""One suite for every quota store (memory, and real Redis through redis-py and through the
pipelined connection): GCRA, windows, budgets, slots."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import pytest

from tenantware.quota import QuotaStore
from tenantware.quota.plan import month_index
from tests.quota_support import NOON, Clock, make_store, plan_for

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis", "multiplexed"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(
    kind: str, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[QuotaStore]:
    url = prefix = ""
    if kind != "memory":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
    made, client = make_store(kind, clock, redis_url=url, prefix=prefix)
    yield made
    if client is not None:
        await client.aclose()


async def test_gcra_admits_exactly_the_burst_and_retry_after_is_exact(
    store: QuotaStore, clock: Clock
) -> None:
    plan = plan_for(store.prefix, requests_per_minute=10)
    granted = [(await store.reserve(plan, 0, 0, f"t{i}")).allowed for i in range(12)]
    assert granted == [True] * 10 + [False] * 2
    refused = await store.reserve(plan, 0, 0, "x")
    assert refused.retry_after_us == 6_000_000  # one emission interval: 60 s / 10
    clock.advance(5.999999)
    assert not (await store.reserve(plan, 0, 0, "x")).allowed
    clock.advance(0.000001)
    assert (await store.reserve(plan, 0, 0, "x")).allowed
    assert not (await store.reserve(plan, 0, 0, "x")).allowed


async def test_gcra_never_admits_more_than_burst_plus_rate_times_window(
    store: QuotaStore, clock: Clock
) -> None:
    # 30/min with burst 2x: emission interval 2 s, burst 60 requests.
    plan = plan_for(store.prefix, requests_per_minute=30, burst_multiplier=2.0)
    rng = random.Random(4)
    admitted: list[float] = []
    for _ in range(400):
        clock.advance(rng.choice((0.0, 0.0, 0.05, 0.4, 1.0, 3.0)))
        if (await store.reserve(plan, 0, 0, "t")).allowed:
            admitted.append(clock.now)
    assert len(admitted) > 60
    for length in (1.0, 10.0, 60.0, 120.0):
        for i, start in enumerate(admitted):
            inside = sum(1 for t in admitted[i:] if t < start + length)
            assert inside <= 60 + length / 2.0


async def test_burst_multiplier_scales_the_instant_allowance(store: QuotaStore) -> None:
    plan = plan_for(store.prefix, requests_per_second=5, burst_multiplier=3.0)
    granted = sum([(await store.reserve(plan, 0, 0, "t")).allowed for _ in range(20)])
    assert granted == 15


async def test_token_reservations_never_overshoot_under_concurrency(store: QuotaStore) -> None:
    plan = plan_for(store.prefix, tokens_per_minute=10_000)
    results: list[bool] = []

    async def one(i: int) -> None:
        results.append((await store.reserve(plan, 1_000, 0, f"t{i}")).allowed)

    async with anyio.create_task_group() as group:
        for i in range(60):
            group.start_soon(one, i)
    assert sum(results) == 10
    assert await store.usage(plan) == [10_000]


async def test_refunded_tokens_are_usable_at_once_and_charged_equals_actual(
    store: QuotaStore,
) -> None:
    plan = plan_for(store.prefix, tokens_per_minute=10_000)
    decisions = [await store.reserve(plan, 2_500, 0, f"t{i}") for i in range(4)]
    assert all(d.allowed for d in decisions)
    assert not (await store.reserve(plan, 1, 0, "full")).allowed
    actual = [700, 2_500, 1_234, 0]
    for i, decision in enumerate(decisions):
        await store.settle(plan, decision.now_us, f"t{i}", actual[i] - 2_500, 0)
    assert await store.usage(plan) == [sum(actual)]
    free = 10_000 - sum(actual)
    assert (await store.reserve(plan, free, 0, "refill")).allowed
    assert not (await store.reserve(plan, 1, 0, "over")).allowed


async def test_a_request_refused_by_one_limit_changes_no_other(store: QuotaStore) -> None:
    plan = plan_for(
        store.prefix, requests_per_minute=5, tokens_per_minute=100, concurrent_requests=3
    )
    refused = await store.reserve(plan, 101, 0, "big")
    assert not refused.allowed
    assert plan.limits[refused.failed].name == "tokens per minute"
    assert await store.usage(plan) == [0, 0, 0]
    ok = await store.reserve(plan, 100, 0, "fits")
    assert ok.allowed
    assert await store.usage(plan) == [1, 100, 1]


async def test_cancel_gives_back_the_request_tokens_cost_and_slot(store: QuotaStore) -> None:
    plan = plan_for(
        store.prefix, requests_per_minute=5, tokens_per_minute=100, concurrent_requests=3,
        daily_budget_usd=Decimal("1"),
    )  # fmt: skip
    decision = await store.reserve(plan, 40, 123, "t")
    assert await store.usage(plan) == [1, 40, 1, 123]
    await store.settle(plan, decision.now_us, "t", -40, -123, cancel=True)
    assert await store.usage(plan) == [0, 0, 0, 0]


async def test_budget_refusal_is_reported_before_rate_limits(store: QuotaStore) -> None:
    plan = plan_for(store.prefix, requests_per_minute=1, daily_budget_usd=Decimal("0.000001"))
    assert (await store.reserve(plan, 10, 1_000, "a")).allowed
    refused = await store.reserve(plan, 10, 1, "b")
    assert not refused.allowed
    assert plan.limits[refused.failed].name == "daily budget"


async def test_budget_has_zero_overshoot_and_charged_equals_actual_to_the_nano_dollar(
    store: QuotaStore,
) -> None:
    budget = Decimal("0.01")  # 10,000,000 nano-USD
    plan = plan_for(store.prefix, daily_budget_usd=budget, monthly_budget_usd=Decimal("5"))
    estimate = 1_300_000
    results: list[tuple[bool, int, str]] = []

    async def one(i: int) -> None:
        decision = await store.reserve(plan, 0, estimate, f"t{i}")
        results.append((decision.allowed, decision.now_us, f"t{i}"))

    async with anyio.create_task_group() as group:
        for i in range(40):
            group.start_soon(one, i)
    granted = [r for r in results if r[0]]
    assert len(granted) == 10_000_000 // estimate
    spent = await store.usage(plan)
    assert spent[0] <= 10_000_000
    actual_total = 0
    for n, (_, now_us, ticket) in enumerate(granted):
        actual = 1_000_003 + n * 7
        actual_total += actual
        await store.settle(plan, now_us, ticket, 0, actual - estimate)
    assert await store.usage(plan) == [actual_total, actual_total]


async def test_concurrency_slots_free_on_settle_and_when_the_lease_ends(
    store: QuotaStore, clock: Clock
) -> None:
    plan = plan_for(store.prefix, concurrent_requests=2)
    first = await store.reserve(plan, 0, 0, "a")
    assert (await store.reserve(plan, 0, 0, "b")).allowed
    refused = await store.reserve(plan, 0, 0, "c")
    assert not refused.allowed
    assert refused.retry_after_us == 1_000_000
    await store.settle(plan, first.now_us, "a", 0, 0)
    assert (await store.reserve(plan, 0, 0, "c")).allowed
    clock.advance(31)  # the default lease is 30 s: a crashed replica's slots come back
    assert await store.usage(plan) == [0]
    assert (await store.reserve(plan, 0, 0, "d")).allowed


async def test_renewed_slots_outlive_their_lease_and_expired_or_settled_ones_stay_free(
    store: QuotaStore, clock: Clock
) -> None:
    plan = plan_for(store.prefix, concurrent_requests=3)
    other = plan_for(store.prefix, tenant="other", concurrent_requests=1)
    long = await store.reserve(plan, 0, 0, "long")
    done = await store.reserve(plan, 0, 0, "done")
    assert (await store.reserve(other, 0, 0, "o")).allowed
    await store.settle(plan, done.now_us, "done", 0, 0)
    for _ in range(5):  # five leases of 30 s, renewed every 20 s
        clock.advance(20)
        assert await store.renew() == 2  # "long" and the other tenant's slot
    assert await store.usage(plan) == [1]
    assert await store.usage(other) == [1]
    assert not (await store.reserve(other, 0, 0, "o2")).allowed
    # A slot whose lease ran out (its process stopped renewing) is not brought back.
    clock.advance(31)
    assert await store.renew() == 0
    assert await store.usage(plan) == [0]
    assert (await store.reserve(other, 0, 0, "o3")).allowed
    await store.settle(plan, long.now_us, "long", 0, 0)


async def test_windows_roll_over_and_late_settles_do_not_touch_the_new_window(
    store: QuotaStore, clock: Clock
) -> None:
    plan = plan_for(store.prefix, tokens_per_minute=1_000)
    old = await store.reserve(plan, 1_000, 0, "a")
    assert not (await store.reserve(plan, 1, 0, "b")).allowed
    clock.advance(60)
    new = await store.reserve(plan, 300, 0, "c")
    assert new.allowed
    await store.settle(plan, old.now_us, "a", -900, 0)
    assert await store.usage(plan) == [300]


async def test_monthly_budget_resets_on_the_first_of_the_month(
    store: QuotaStore, clock: Clock
) -> None:
    plan = plan_for(store.prefix, monthly_budget_usd=Decimal("0.000001"))  # 1,000 nano-USD
    clock.now = dt.datetime(2026, 2, 28, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    assert (await store.reserve(plan, 0, 1_000, "a")).allowed
    assert not (await store.reserve(plan, 0, 1, "b")).allowed
    clock.advance(1)
    assert (await store.reserve(plan, 0, 1_000, "c")).allowed


async def test_per_model_limits_share_the_tenant_slot(store: QuotaStore) -> None:
    from tenantware.quota import build_plan
    from tests.support import make_config

    config = make_config(quota={"model_limits": {"gpt-4.1": {"requests_per_minute": 2}}})
    plan, global_plan = build_plan(
        config, "acme", config.all_tiers()["free"].limits, "gpt-4.1", store.prefix
    )
    assert plan is not None
    assert global_plan is None
    assert len({key.split("{")[1].split("}")[0] for key in plan.keys}) == 1
    granted = sum([(await store.reserve(plan, 1, 0, "t")).allowed for _ in range(4)])
    assert granted == 2


async def test_redis_time_is_used_when_no_clock_is_injected(
    redis_url: str, redis_prefix: str
) -> None:
    store, client = make_store("redis", None, redis_url=redis_url, prefix=redis_prefix)
    assert client is not None
    try:
        plan = plan_for(redis_prefix, requests_per_hour=3)
        decision = await store.reserve(plan, 0, 0, "t")
        seconds, micros = await client.time()
        assert abs(seconds * 1_000_000 + micros - decision.now_us) < 5_000_000
        assert sum([(await store.reserve(plan, 0, 0, "t")).allowed for _ in range(5)]) == 2
        ttl = await client.pttl(plan.keys[0])
        assert 0 < ttl <= 3_600_000 + 1
    finally:
        await client.aclose()


async def test_redis_keys_expire_and_scripts_survive_a_script_flush(
    redis_url: str, redis_prefix: str
) -> None:
    store, client = make_store("redis", None, redis_url=redis_url, prefix=redis_prefix)
    assert client is not None
    plan = plan_for(
        redis_prefix, requests_per_second=5, tokens_per_minute=100, concurrent_requests=2,
        daily_budget_usd=Decimal("1"), monthly_budget_usd=Decimal("2"),
    )  # fmt: skip
    try:
        decision = await store.reserve(plan, 10, 10, "t")
        assert decision.allowed
        for key in plan.keys:
            assert await client.pttl(key) > 0, key
        await client.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
        await store.settle(plan, decision.now_us, "t", -5, -5)
        assert (await store.reserve(plan, 10, 10, "u")).allowed
        assert await store.usage(plan) == [2, 15, 1, 15, 15]
    finally:
        await client.aclose()


def test_month_index_matches_the_calendar() -> None:
    rng = random.Random(7)
    for _ in range(2_000):
        stamp = rng.randrange(0, 4_102_444_800)  # 1970 .. 2100
        day = dt.datetime.fromtimestamp(stamp, dt.UTC)
        assert month_index(stamp * 1_000_000) == (day.year * 12 + day.month - 1)
    assert month_index(int(NOON * 1_000_000)) == 2026 * 12 + 10


async def test_redis_gcra_on_real_time_waits_exactly_the_retry_after(
    redis_url: str, redis_prefix: str
) -> None:
    store, client = make_store("redis", None, redis_url=redis_url, prefix=redis_prefix)
    assert client is not None
    try:
        plan = plan_for(redis_prefix, requests_per_second=4)  # burst 4, then one per 250 ms
        assert sum([(await store.reserve(plan, 0, 0, "t")).allowed for _ in range(4)]) == 4
        refused = await store.reserve(plan, 0, 0, "t")
        assert not refused.allowed
        assert 0 < refused.retry_after_us <= 250_000
        await anyio.sleep(refused.retry_after_us / 1_000_000 + 0.002)
        assert (await store.reserve(plan, 0, 0, "t")).allowed
    finally:
        await client.aclose()


@pytest.mark.parametrize("given", ["the same day", "another day"])
async def test_the_reservation_counts_in_the_month_of_redis_time(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """The reserve script takes the month Python gives for a day when Redis's time falls on
    that day, and computes it (the calendar arithmetic in Lua) when it falls on another: the
    monthly counter holds the month of the reservation's time either way."""
    import tenantware.quota.redis as quota_redis
    from tenantware.quota.plan import DAY_US, day_and_month

    if given == "another day":  # as when the gateway's clock and Redis's disagree on the day

        def wrong(now_us: int) -> tuple[int, int]:
            day, month = day_and_month(now_us)
            return day + 1, month + 1

        monkeypatch.setattr(quota_redis, "day_and_month", wrong)
    clock = Clock()
    store, client = make_store("redis", clock, redis_url=redis_url, prefix=redis_prefix)
    assert client is not None
    plan = plan_for(redis_prefix, monthly_budget_usd=Decimal("1"))
    rng = random.Random(11)
    stamps: list[float] = [rng.randrange(0, 4_102_444_800) for _ in range(40)]
    stamps += [dt.datetime(2028, 2, 29, 23, 59, 59, tzinfo=dt.UTC).timestamp(), 0.0]
    try:
        for i, stamp in enumerate(stamps):
            clock.now = stamp
            await client.delete(plan.keys[0])
            assert (await store.reserve(plan, 0, 1_000, f"t{i}")).allowed
            day = dt.datetime.fromtimestamp(stamp, dt.UTC)
            window = await client.hget(plan.keys[0], "w")
            assert int(window) == day.year * 12 + day.month - 1, (day, window)
            assert int(stamp * 1_000_000) // DAY_US == day_and_month(int(stamp * 1e6))[0]
    finally:
        await client.aclose()
