"""Reserve and acquire in one script on a single Redis: one round trip before the upstream.

The quota layer reserves the request's limits and asks the admission pool for a seat in one
script call (``tenantware.joint``); the seat is asked for only when every limit granted, a
call run after its deadline writes nothing for either half, and on a cluster (or in memory)
each layer still makes its own call.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tenantware.admission import redis as admission_redis
from tenantware.admission.core import GRANTED, QUEUED, Ticket
from tenantware.admission.redis import RedisSeatStore
from tenantware.backends.multiplex import MultiplexedRedis, RedisConnectionError
from tenantware.backends.redis_clock import RedisClock
from tenantware.backends.redis_support import connect_redis
from tenantware.joint import redis as joint_redis
from tenantware.joint.redis import RedisReserveAcquire, compose
from tenantware.middleware.quota import QuotaMiddleware
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.quota import redis as quota_redis
from tenantware.quota.failover import FailoverQuotaStore
from tenantware.quota.plan import Plan
from tenantware.quota.redis import RedisQuotaStore
from tenantware.stores import Stores
from tenantware.testing.upstream import FakeUpstreamConfig
from tests.quota_support import plan_for
from tests.support import CHAT, KEYS, tenant_entries
from tests.support import script_sha as _sha
from tests.test_stack import backend_settings, running_stack


def _kinds(batch: list[bytes]) -> list[str]:
    """What each command of one write was."""
    joint, reserve = _sha(joint_redis._SCRIPT), _sha(quota_redis._RESERVE)
    settle, admission = _sha(quota_redis._SETTLE), _sha(admission_redis._SCRIPT)
    both = _sha(joint_redis._SETTLE_RELEASE)
    kinds = []
    for command in batch:
        if joint in command:
            kinds.append("joint")
        elif both in command:
            kinds.append("settle+release")
        elif reserve in command:
            kinds.append("reserve")
        elif settle in command:
            kinds.append("settle")
        elif admission in command and b"$7\r\nacquire\r\n" in command:
            kinds.append("acquire")
        elif admission in command and b"$7\r\nrelease\r\n" in command:
            kinds.append("release")
    return sorted(kinds)


# -- the whole stack on one Redis --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_one_call_before_the_upstream_and_one_after(
    request: pytest.FixtureRequest, writes: list[list[bytes]], stream: bool
) -> None:
    with running_stack(gateway=backend_settings("redis", request)) as stack:
        for _ in range(3):
            with stack.http() as client:
                response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert response.status_code == 200, response.text
        stack.wait_upstream_idle()
        deadline = time.monotonic() + 10.0
        while True:  # settle + release follow the response (bounded wait)
            after = [_kinds(batch) for batch in list(writes)]
            if after.count(["settle+release"]) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        # One request at a time: its reservation and seat request are one command in one
        # write; its settle and release another. No call of either layer's own.
        assert after.count(["joint"]) == 3, after
        assert after.count(["settle+release"]) == 3, after
        alone = {"reserve", "acquire", "settle", "release"}
        assert not [kinds for kinds in after if alone & set(kinds)]
        assert stack.quota("acme")["slots"] == 0
        assert stack.seats() == {"*": (0, 0)}


def test_a_refused_burst_takes_no_seat_through_the_stack(
    request: pytest.FixtureRequest, writes: list[list[bytes]]
) -> None:
    # acme may make 2 requests a minute; 12 arrive together on a pool of one seat. Each
    # request makes one joint call; the 10 the quota refuses are answered 429 without a
    # seat or a queue place (a queue of one would have refused some as queue_full).
    tenants = tenant_entries()
    tenants[0]["limits"] = {"requests_per_minute": 2, "concurrent_requests": 64}
    overrides: dict[str, Any] = {
        "tenants": tenants,
        "admission": {"seats": 1, "max_queue_per_tenant": 1},
    }
    gateway = backend_settings("redis", request)
    with running_stack(FakeUpstreamConfig(latency_s=0.2), gateway=gateway, **overrides) as stack:
        statuses: list[int] = []
        codes: list[str] = []

        async def burst() -> None:
            headers = {"authorization": f"Bearer {KEYS['acme']}"}
            async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=10) as http:

                async def one() -> None:
                    response = await http.post("/v1/chat/completions", json=CHAT)
                    statuses.append(response.status_code)
                    if response.status_code != 200:
                        codes.append(response.json()["error"]["code"])

                async with anyio.create_task_group() as group:
                    for _ in range(12):
                        group.start_soon(one)

        anyio.run(burst)
        assert sorted(statuses) == [200] * 2 + [429] * 10, statuses
        assert codes == ["rate_limit_exceeded"] * 10
        stack.wait_upstream_idle()
        commands = [kind for batch in list(writes) for kind in _kinds(batch)]
        assert commands.count("joint") == 12, commands
        assert "acquire" not in commands
        assert "reserve" not in commands
        assert stack.seats() == {"*": (0, 0)}


# -- the joint call itself ---------------------------------------------------------------


class Joint:
    """A quota store, one seat pool and their joint call on one pipelined connection."""

    def __init__(self, scripts: MultiplexedRedis, redis: Any, prefix: str, seats: int) -> None:
        self.primary = RedisQuotaStore(scripts, prefix=prefix)
        self.quota = FailoverQuotaStore(self.primary, timeout_s=2.0)
        self.pool = RedisSeatStore(
            redis, seats=seats, prefix=prefix, scripts=scripts, max_queue=100
        )
        self.joint = RedisReserveAcquire(self.quota, self.primary)
        self.joint.add(self.pool)

    async def call(self, plan: Plan, ticket: str, tenant: str = "noisy") -> tuple[Any, Any]:
        seat = Ticket(tenant, 1.0, 10.0)
        decision, status = await self.joint.reserve_acquire(
            plan, 1, 1, ticket, None, self.pool, seat
        )
        return decision, status


@asynccontextmanager
async def _joint_on(redis_url: str, prefix: str, seats: int) -> AsyncIterator[Joint]:
    scripts = MultiplexedRedis(redis_url, timeout_s=2.0)
    async with connect_redis(redis_url, timeout_s=2.0) as redis:
        try:
            yield Joint(scripts, redis, prefix, seats=seats)
        finally:
            await scripts.aclose()


@pytest.fixture
async def joint(redis_url: str, redis_prefix: str) -> AsyncIterator[Joint]:
    """A joint call on a pool of one seat."""
    async with _joint_on(redis_url, redis_prefix, 1) as made:
        yield made


@pytest.fixture
async def roomy(redis_url: str, redis_prefix: str) -> AsyncIterator[Joint]:
    """A joint call on a pool of 4 seats."""
    async with _joint_on(redis_url, redis_prefix, 4) as made:
        yield made


@pytest.mark.anyio
async def test_a_burst_over_the_quota_takes_no_seat_and_no_queue_place(
    joint: Joint, redis_prefix: str
) -> None:
    plan = plan_for(redis_prefix, "noisy", requests_per_minute=3)
    answers: list[tuple[Any, Any]] = []

    async def one(i: int) -> None:
        answers.append(await joint.call(plan, f"t{i}"))

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(one, i)
    granted = [status for decision, status in answers if decision.allowed]
    refused = [status for decision, status in answers if not decision.allowed]
    assert len(granted) == 3, answers
    assert all(decision.source == "store" for decision, _ in answers)
    # One seat: the first granted request holds it, the other two wait; the 17 refused
    # requests were never asked of the pool.
    assert sorted(granted) == [GRANTED, QUEUED, QUEUED]
    assert refused == [None] * 17
    state = await joint.pool.state()
    assert (state["in_use"], state["waiting"]) == (1, 2)
    assert state["tenants"]["noisy"]["queued"] == 2


@pytest.mark.anyio
async def test_a_stale_joint_call_changes_nothing(joint: Joint, redis_prefix: str) -> None:
    # Redis runs the call after its deadline (as after a pause): neither the reservation
    # nor the seat request is written; the quota failure policy answers (``local`` here) and
    # leaves the seat to the admission layer's own acquire.
    plan = plan_for(redis_prefix, "late", concurrent_requests=1, requests_per_minute=10)
    joint.primary.redis_clock.observe(1)  # Redis time as if seen long ago: deadline past
    decision, status = await joint.call(plan, "t1", tenant="late")
    assert (decision.allowed, decision.source, status) == (True, "local", None)
    assert await joint.primary.usage(plan) == [0, 0]
    state = await joint.pool.state()
    assert (state["in_use"], state["waiting"], state["tenants"]) == (0, 0, {})
    # With a current estimate (and the outage over) the same call grants both halves.
    joint.primary.redis_clock = RedisClock(1_000_000)
    joint.quota.failover.health.down = False
    decision, status = await joint.call(plan, "t2", tenant="late")
    assert (decision.allowed, decision.source, status) == (True, "store", GRANTED)
    assert (await joint.pool.state())["in_use"] == 1
    assert joint.primary.redis_clock.deadline(0.0) > 0


@pytest.mark.anyio
async def test_composed_from_the_layers_own_scripts() -> None:
    # Each layer's script is the body of one function: a change inside either (another
    # key layout, fewer commands) changes the joint script with it.
    script = joint_redis._SCRIPT
    assert quota_redis.lua_source("reserve") in script
    assert admission_redis.lua_source() in script
    assert script == compose(quota_redis.lua_source("reserve"), admission_redis.lua_source())
    after = joint_redis._SETTLE_RELEASE
    assert quota_redis.lua_source("settle") in after
    assert admission_redis.lua_source() in after


# -- settle and release in one call ------------------------------------------------------


async def _reserve_settle_release(joint: Joint, plan: Plan, ticket: str) -> Ticket:
    """One request: reserve 100 tokens and a seat, settle to 60 and release in one call."""
    seat = Ticket("acme", 1.0, 10.0)
    decision, status = await joint.joint.reserve_acquire(
        plan, 100, 0, ticket, None, joint.pool, seat
    )
    assert (decision.allowed, status) == (True, GRANTED)
    await joint.joint.settle_release(
        plan, decision.now_us, ticket, -40, 0, 0, joint.pool, seat, 6.0, 60.0
    )
    return seat


@pytest.mark.anyio
async def test_settle_and_release_in_one_call_apply_once(roomy: Joint, redis_prefix: str) -> None:
    joint = roomy
    plan = plan_for(redis_prefix, "acme", tokens_per_minute=10_000, concurrent_requests=5)
    for i in range(3):
        await _reserve_settle_release(joint, plan, f"t{i}")
    assert await joint.primary.usage(plan) == [3 * 60, 0]  # tokens corrected once each
    assert joint.primary._held == set()  # no slot left to renew
    state = await joint.pool.state()
    assert (state["in_use"], state["waiting"]) == (0, 0)
    assert state["tenants"]["acme"]["held"] == 0


@pytest.mark.anyio
async def test_settle_and_release_declines_a_seat_that_is_not_the_pools_in_redis(
    roomy: Joint, redis_prefix: str
) -> None:
    # A seat the local pool granted (the admission failure policy) is released by that pool,
    # not by a script on Redis: the joint call sends nothing and says so, and the quota
    # layer then settles and releases each as alone.
    joint = roomy
    plan = plan_for(redis_prefix, "acme", tokens_per_minute=10_000, concurrent_requests=5)
    seat = Ticket("acme", 1.0, 10.0)
    decision, status = await joint.joint.reserve_acquire(
        plan, 100, 0, "local", None, joint.pool, seat
    )
    assert (decision.allowed, status) == (True, GRANTED)
    seat.lease = admission_redis._LOCAL
    sent = await joint.joint.settle_release(
        plan, decision.now_us, "local", -40, 0, 0, joint.pool, seat, 6.0, 60.0
    )
    assert sent is False
    assert await joint.primary.usage(plan) == [100, 1]  # not settled: reserved, slot held
    assert (await joint.pool.state())["in_use"] == 1  # the Redis seat untouched


class _Fails:
    """The joint settle + release script failing as on an outage: before Redis ran it, or
    after (the answer lost)."""

    def __init__(self, script: Any, *, ran: bool) -> None:
        self.script = script
        self.ran = ran
        self.calls = 0

    async def __call__(self, keys: Any, args: Any) -> Any:
        self.calls += 1
        if self.ran:
            await self.script(keys=keys, args=args)
        raise RedisConnectionError("Redis stopped answering")


@pytest.mark.anyio
@pytest.mark.parametrize("ran", [False, True])
async def test_a_failed_settle_and_release_is_applied_at_most_once_and_frees_both(
    roomy: Joint, redis_prefix: str, ran: bool
) -> None:
    joint = roomy
    # The call fails (Redis stopped before running it, or ran it and the answer was lost):
    # the settle is not sent again (the reservation stays charged at its estimate, the safe
    # side, or was corrected once); the slot and the seat come back as soon as Redis answers
    # again (the next call), never twice.
    plan = plan_for(redis_prefix, "acme", tokens_per_minute=10_000, concurrent_requests=5)
    real = joint.joint._settle_release
    failing = _Fails(real, ran=ran)
    joint.joint._settle_release = failing
    await _reserve_settle_release(joint, plan, "lost")
    assert failing.calls == 1
    assert joint.quota.failover.down
    # Redis answers again: the next request's joint call is the probe; it frees what the
    # failed call may have left, then this request settles and releases normally.
    joint.joint._settle_release = real
    joint.quota.failover.health._probe_at = 0.0
    await _reserve_settle_release(joint, plan, "next")
    tokens, slots = await joint.primary.usage(plan)
    assert tokens == (60 if ran else 100) + 60
    assert slots == 0
    state = await joint.pool.state()
    assert (state["in_use"], state["waiting"]) == (0, 0)
    assert state["tenants"]["acme"]["held"] == 0


# -- where nothing changes ---------------------------------------------------------------


def test_memory_stores_make_no_joint_call() -> None:
    assert Stores("memory://").joint() is None


def test_a_cluster_keeps_two_calls(cluster_urls: list[str]) -> None:
    # On a cluster the pool's keys and the tenant's live in different slots: no joint call;
    # the quota layer reserves alone and the admission layer acquires, as before.
    url = "redis+cluster://" + cluster_urls[0].split("://", 1)[1]
    gateway = {"redis_url": url, "redis_prefix": "twjoint:", "redis_timeout_s": 1.0}
    with running_stack(gateway=gateway) as stack:
        assert stack.gateway.stores.joint() is None
        quota = [m for m in stack.gateway.middleware() if m.cls is QuotaMiddleware]
        assert quota[0].kwargs["joint"] is None
        with stack.http() as client:
            response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        stack.wait_upstream_idle()
        deadline = time.monotonic() + 5.0
        while stack.seats() != {"*": (0, 0)} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stack.seats() == {"*": (0, 0)}


@pytest.mark.anyio
async def test_a_seat_the_admission_layer_never_took_is_given_back(
    redis_url: str, redis_prefix: str
) -> None:
    # An app that mounts the quota layer with the pools but no admission layer inside: the
    # seat its reservation call took is given back when the request ends.
    from tests.test_redis_pause import BODY, gateway_for, inner

    gateway = gateway_for(redis_url, redis_prefix)
    joint = gateway.stores.joint()
    assert joint is not None
    quota = QuotaMiddleware(
        inner,
        live=gateway.live,
        store=gateway.quota_store,
        admission=gateway.admission,
        joint=joint,
    )
    app = TenantMiddleware(quota, live=gateway.live)
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": "Bearer sk-steady"}
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers) as http,
    ):
        for _ in range(3):
            response = await http.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
        state = (await gateway.admission.state())["*"]
        assert (state["in_use"], state["waiting"]) == (0, 0)
        assert state["tenants"]["steady"]["held"] == 0
