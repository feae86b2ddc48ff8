"""Concurrency slots are short leases renewed while their requests run (issue 21), on real
Redis through whole gateways: a stream far longer than the lease keeps its slot, and the slot
of a process that stops renewing comes back after one lease."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as redis_asyncio

from tenantware import Gateway, KeyHasher, parse_config
from tenantware.types import Receive, Scope, Send

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LEASE_S = 2.0
BODY = {"model": "gpt-4.1", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"authorization": "Bearer sk-streamer"}
HOLD = {"x-hold": "1"}
#: How long any wait in these tests may last before it fails (a loaded host is slow).
PATIENCE_S = 30.0


def gateway_for(url: str, prefix: str, slots: int) -> Gateway:
    return Gateway(
        parse_config(
            {
                "gateway": {"redis_url": url, "redis_prefix": prefix, "redis_timeout_s": 1.0},
                "quota": {"lease_s": LEASE_S},
                "admission": {"enabled": False},
                "metering": {"enabled": False},
                "tiers": {"plain": {}},
                "tenants": [
                    {
                        "id": "streamer",
                        "tier": "plain",
                        "limits": {"concurrent_requests": slots},
                        "keys": [{"id": "s-1", "hash": KeyHasher().hash("sk-streamer")}],
                    }
                ],
                "upstreams": [
                    {"name": "fake", "base_url": "http://upstream.test/v1", "models": ["gpt-4.1"]}
                ],
            }
        )
    )


class Streams:
    """The inner app: a request with ``x-hold`` streams chunks until ``finish`` is set."""

    def __init__(self) -> None:
        self.finish = anyio.Event()
        self.streaming = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if (b"x-hold", b"1") in scope["headers"]:
            self.streaming += 1
            with anyio.move_on_after(PATIENCE_S):
                while not self.finish.is_set():
                    await send(
                        {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
                    )
                    with anyio.move_on_after(0.1):
                        await self.finish.wait()
        await send({"type": "http.response.body", "body": b"{}"})


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=HEADERS
    )


async def slots_taken(client: Any, prefix: str) -> int:
    """Concurrency slots whose lease has not expired, read from Redis in Redis time."""
    seconds, micros = await client.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    taken = 0
    async for key in client.scan_iter(match=f"{prefix}*conc*"):
        taken += await client.zcount(key, now_us, "+inf")
    return taken


async def until(condition: Any) -> None:
    """Wait (bounded) until ``await condition()`` is true."""
    with anyio.fail_after(PATIENCE_S):
        while not await condition():
            await anyio.sleep(0.05)


async def test_a_stream_longer_than_several_leases_keeps_its_slot(
    redis_url: str, redis_prefix: str
) -> None:
    gateway = gateway_for(redis_url, redis_prefix, slots=1)
    streams = Streams()
    async with (
        gateway.running(),
        client_for(gateway.wrap(streams)) as http,
        redis_asyncio.from_url(redis_url) as direct,
        anyio.create_task_group() as group,
    ):
        statuses: list[int] = []

        async def long_stream() -> None:
            statuses.append(
                (await http.post("/v1/chat/completions", json=BODY, headers=HOLD)).status_code
            )

        group.start_soon(long_stream)
        await until(lambda: _true(streams.streaming == 1))
        # For three leases, every other request finds the one slot taken.
        held_since = time.monotonic()
        refused = 0
        while time.monotonic() < held_since + 3 * LEASE_S:
            response = await http.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            refused += 1
            assert await slots_taken(direct, redis_prefix) == 1
            await anyio.sleep(0.25)
        assert refused >= 4
        streams.finish.set()
        await until(lambda: _true(statuses == [200]))
        # Settled: the slot is back at once, not after a lease.
        assert await slots_taken(direct, redis_prefix) == 0
        assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200


async def test_the_slot_of_a_process_that_stops_renewing_comes_back_after_its_lease(
    redis_url: str, redis_prefix: str
) -> None:
    # Two processes share two slots. ``alive`` renews its leases (its services run);
    # ``stalled`` holds a slot but never renews it, as a process whose renewal died.
    alive = gateway_for(redis_url, redis_prefix, slots=2)
    stalled = gateway_for(redis_url, redis_prefix, slots=2)
    streams = Streams()
    try:
        async with (
            alive.running(),
            client_for(alive.wrap(streams)) as http,
            client_for(stalled.wrap(streams)) as stalled_http,
            redis_asyncio.from_url(redis_url) as direct,
            anyio.create_task_group() as group,
        ):
            statuses: list[int] = []

            async def long_stream(client: httpx.AsyncClient) -> None:
                response = await client.post("/v1/chat/completions", json=BODY, headers=HOLD)
                statuses.append(response.status_code)

            group.start_soon(long_stream, http)
            group.start_soon(long_stream, stalled_http)
            await until(lambda: _true(streams.streaming == 2))
            response = await http.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 429, response.text

            # The stalled process's slot expires after its lease; the live one's is kept.
            async def one_slot_left() -> bool:
                return await slots_taken(direct, redis_prefix) == 1

            await until(one_slot_left)
            assert (await http.post("/v1/chat/completions", json=BODY)).status_code == 200
            await anyio.sleep(2 * LEASE_S)  # two more leases: still held by the live stream
            assert await slots_taken(direct, redis_prefix) == 1
            streams.finish.set()
            await until(lambda: _true(statuses == [200, 200]))
            assert await slots_taken(direct, redis_prefix) == 0
    finally:
        await stalled.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_during_an_outage_local_slots_are_renewed_and_a_failed_renewal_is_not_raised() -> (
    None
):
    from tenantware.backends.redis_support import connect_redis
    from tenantware.quota import FailoverQuotaStore, MemoryQuotaStore, RedisQuotaStore
    from tests.quota_support import Clock, plan_for

    clock = Clock()
    async with connect_redis("redis://127.0.0.1:1/0", timeout_s=1.0) as unreachable:
        store = FailoverQuotaStore(
            RedisQuotaStore(unreachable),
            fallback=MemoryQuotaStore(clock=clock),
            probe_interval_s=0.0,
        )
        plan = plan_for("", concurrent_requests=1)  # concurrency: ``local`` by default
        granted = await store.reserve(plan, 0, 0, "long")
        assert granted.source == "local"
        for _ in range(4):  # two leases of 30 s, renewed every 20 s; every Redis call fails
            clock.advance(20)
            assert await store.renew() == 1
        assert not (await store.reserve(plan, 0, 0, "other")).allowed
        await store.settle(plan, granted.now_us, "long", 0, 0, local=True)
        assert (await store.reserve(plan, 0, 0, "other")).allowed


async def test_a_slot_whose_settle_missed_an_outage_is_no_longer_renewed(
    redis_url: str, redis_prefix: str
) -> None:
    # A request ends while Redis is considered down: its settle is not sent and the release
    # of its slot is queued. Were that queue to overflow (a long outage, many requests), the
    # slot must still come back by its lease: renewal forgets it.
    from tenantware.backends.errors import StoreUnavailable
    from tenantware.backends.redis_clock import GivenUp
    from tenantware.backends.redis_support import connect_redis
    from tenantware.quota import FailoverQuotaStore, RedisQuotaStore
    from tests.quota_support import Clock, plan_for

    clock = Clock()
    async with connect_redis(redis_url, timeout_s=5.0) as client:
        store = FailoverQuotaStore(RedisQuotaStore(client, prefix=redis_prefix, clock=clock))
        store._given_up = GivenUp(limit=0)  # the queue of releases overflows at once
        plan = plan_for(redis_prefix, concurrent_requests=2)
        ended = await store.reserve(plan, 0, 0, "ended")
        running = await store.reserve(plan, 0, 0, "running")
        assert ended.source == running.source == "store"
        store.failover.failed(StoreUnavailable("outage"), "test")
        await store.settle(plan, ended.now_us, "ended", 0, 0)  # not sent: the store is down
        store.failover.succeeded()
        for _ in range(3):  # 60 s: two leases of 30 s, renewed every 20 s
            clock.advance(20)
            await store.renew()
        assert await store.usage(plan) == [1]  # the running request's slot only
        await store.settle(plan, running.now_us, "running", 0, 0)
        assert await store.usage(plan) == [0]
