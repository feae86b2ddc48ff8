"""A Redis pause leaves nothing behind (issue 21): seat requests and concurrency-slot
reservations the gateway gave up on while Redis was stopped are not granted to requests
that are gone, so capacity returns right after SIGCONT instead of after the leases."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis_asyncio

from tenantware import Gateway, KeyHasher, metrics, parse_config
from tenantware.admission.core import GRANTED, Ticket
from tenantware.admission.redis import RedisSeatStore
from tenantware.admission.store import UNAVAILABLE
from tenantware.backends.errors import STORE_UNAVAILABLE, StoreUnavailable
from tenantware.backends.progress import watch_of
from tenantware.backends.redis_clock import RedisClock
from tenantware.backends.redis_support import connect_redis
from tenantware.quota.redis import RedisQuotaStore
from tenantware.types import Receive, Scope, Send
from tests.quota_support import plan_for
from tests.servers import RedisServer, ServiceUnavailable, throwaway_redis

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

SEATS = 6
WORKERS = 12
BOUND_S = 0.25
PROBE_S = 0.25
#: The admission seats' lease (``admission.lease_s``, left at its default here).
SEAT_LEASE_S = 30.0
#: How long after the workers are done the pool and slots may take to be empty again: well
#: under the seats' lease, so what frees the seats is the gateway, never an expiry (the
#: 2 s slot lease of the second case is shorter: there the check is that nothing stays).
RECOVERY_S = SEAT_LEASE_S / 3
BODY = {"model": "gpt-4.1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def gateway_for(
    url: str, prefix: str, lease_s: float = 30.0, breaker: dict[str, Any] | None = None
) -> Gateway:
    return Gateway(
        parse_config(
            {
                "gateway": {
                    "redis_url": url,
                    "redis_prefix": prefix,
                    "redis_timeout_s": BOUND_S,
                    "store_probe_interval_s": PROBE_S,
                },
                "admission": {"seats": SEATS},
                "quota": {"lease_s": lease_s},
                "breaker": breaker or {},
                "metering": {"enabled": False},
                "tiers": {"plain": {}},
                "tenants": [
                    {
                        "id": "steady",
                        "tier": "plain",
                        "limits": {"concurrent_requests": SEATS},
                        "keys": [{"id": "steady-1", "hash": KeyHasher().hash("sk-steady")}],
                    }
                ],
                "upstreams": [
                    {"name": "fake", "base_url": "http://upstream.test/v1", "models": ["gpt-4.1"]}
                ],
            }
        )
    )


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await anyio.sleep(0.02)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def slots_taken(client: Any, prefix: str) -> int:
    """Concurrency slots of the tenant whose lease has not expired, read from Redis."""
    seconds, micros = await client.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    taken = 0
    async for key in client.scan_iter(match=f"{prefix}*conc*"):
        taken += await client.zcount(key, now_us, "+inf")
    return taken


@pytest.fixture
def server() -> Any:
    try:
        with throwaway_redis() as server:
            yield server
    except ServiceUnavailable as exc:
        pytest.skip(f"no throwaway Redis: {exc.reason}")


@pytest.mark.parametrize("lease_s", [30.0, 2.0], ids=["default-lease", "lease-shorter-than-pause"])
async def test_a_paused_redis_gives_back_every_seat_and_slot_after_sigcont(
    server: RedisServer, lease_s: float
) -> None:
    # With the default lease, nothing waits for a lease to end; with a lease shorter than the
    # pause, the renewals that failed during it leave nothing stuck either.
    prefix = f"twpause:{uuid.uuid4().hex[:8]}:"
    gateway = gateway_for(server.url, prefix, lease_s)
    app = gateway.wrap(inner)
    stop = False
    statuses: dict[int, int] = {}
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": "Bearer sk-steady"}
    async with (
        gateway.running(),
        httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers) as http,
        redis_asyncio.from_url(server.url) as direct,
    ):

        async def worker() -> None:
            for _ in range(5000):  # bounded; normally ended by ``stop``
                if stop:
                    return
                response = await http.post("/v1/chat/completions", json=BODY)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async with anyio.create_task_group() as group:
            for _ in range(WORKERS):
                group.start_soon(worker)
            await anyio.sleep(1.0)
            server.pause()
            try:
                await anyio.sleep(2.5)
            finally:
                server.resume()
                resumed_at = time.monotonic()
            await anyio.sleep(0.3)
            stop = True  # the workers finish their requests in flight and end
        assert statuses.get(200, 0) > 0, statuses

        # Long before a lease (30 s for the seats in both cases) could have freed anything, no
        # request is live, the pool and the tenant's slots are empty again, and a new request
        # is admitted. On a quiet host that takes about a probe interval after SIGCONT; the
        # bound is a third of the lease, counted from when the workers are done: on a host at
        # load 12+ draining them alone can take longer than a second, and a call Redis runs
        # late after SIGCONT declares one more short outage (a probe interval).
        state: dict[str, Any] = {}
        taken = -1
        admitted = 0
        # What a failure needs to tell: how late the check began (the workers' last requests
        # end first) and what the state calls raised.
        began = time.monotonic()
        checks: dict[str, Any] = {"began_s": began - resumed_at, "errors": []}
        deadline = began + RECOVERY_S
        while time.monotonic() < deadline:
            response = await http.post("/v1/chat/completions", json=BODY)
            admitted += response.status_code == 200
            try:
                state = (await gateway.admission.state())["*"]
            except STORE_UNAVAILABLE as exc:
                checks["errors"].append(repr(exc))
                continue
            taken = await slots_taken(direct, prefix)
            if state["in_use"] == 0 and state["waiting"] == 0 and taken == 0 and admitted:
                break
            await anyio.sleep(0.05)
        assert state.get("in_use") == 0, (state, checks)
        assert state.get("waiting") == 0, (state, checks)
        assert taken == 0
        assert admitted > 0
        assert not gateway.stores.health.down  # decided by Redis again, not by a policy


async def test_a_call_run_after_its_deadline_grants_nothing(
    redis_url: str, redis_prefix: str
) -> None:
    # Redis runs the call after the deadline its caller sent (as after a pause): nothing is
    # granted or written, and the caller sees an unavailable store (its policy answers).
    async with connect_redis(redis_url, timeout_s=2.0) as client:
        quota = RedisQuotaStore(client, prefix=redis_prefix)
        plan = plan_for(redis_prefix, "late", concurrent_requests=1, requests_per_minute=10)
        quota.redis_clock.observe(1)  # Redis time as if seen long ago: the deadline is past
        with pytest.raises(StoreUnavailable):
            await quota.reserve(plan, 0, 0, "t1")
        assert await quota.usage(plan) == [0, 0]
        seats = RedisSeatStore(client, seats=1, prefix=redis_prefix, on_failure="closed")
        seats.redis_clock.observe(1)
        assert await seats.acquire(Ticket("late", 1.0, 1.0)) == UNAVAILABLE
        assert (await seats.state())["in_use"] == 0
        # With a current estimate the same calls are granted.
        quota.redis_clock = RedisClock(1_000_000)
        assert (await quota.reserve(plan, 0, 0, "t2")).allowed
        assert quota.redis_clock.deadline(0.0) > 0  # learnt from the reply
        seats = RedisSeatStore(client, seats=1, prefix=redis_prefix, on_failure="closed")
        assert await seats.acquire(Ticket("late", 1.0, 1.0)) == GRANTED
        assert seats.redis_clock.deadline(0.0) > 0


def _failures(layer: str) -> float:
    labels = {"layer": layer, "policy": "local"}
    return metrics.REGISTRY.get_sample_value("tenantware_store_failures_total", labels) or 0.0


async def test_a_request_waits_for_a_stopped_redis_once_not_once_per_layer(
    server: RedisServer,
) -> None:
    # The quota layer's call waits the bound and declares the outage; the breaker layer, whose
    # redis-py client reaches the same Redis, then decides locally at once instead of sending
    # its own call and waiting its own bound (or probing on its own schedule) for the same
    # request. Its circuit copies go stale in far less than the bound, so without that rule
    # each request below would send the breaker's re-read to the stopped Redis.
    gateway = gateway_for(
        server.url, f"twonce:{uuid.uuid4().hex[:8]}:", breaker={"sync_interval_s": BOUND_S / 5}
    )
    app = gateway.wrap(inner)
    headers = {"authorization": "Bearer sk-steady"}
    async with (
        gateway.running(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=headers
        ) as http,
    ):
        # Answered by Redis: every store is connected and the breaker's client has been answered
        # (from now on its calls are bounded by its progress watch).
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
        breaker_stalls = watch_of(gateway.redis).stalls
        before = {layer: _failures(layer) for layer in ("quota", "breaker")}
        server.pause()
        try:
            first = await http.post("/v1/chat/completions", json=BODY)  # declares the outage
            await anyio.sleep(PROBE_S * 2)
            second = await http.post("/v1/chat/completions", json=BODY)  # the quota probe
        finally:
            server.resume()
        assert (first.status_code, second.status_code) == (200, 200)
        # Both answered by the local policies, counted by both layers...
        assert _failures("quota") - before["quota"] == 2
        assert _failures("breaker") - before["breaker"] >= 2
        # ...and the breaker's client never waited for the stopped Redis.
        assert watch_of(gateway.redis).stalls == breaker_stalls
