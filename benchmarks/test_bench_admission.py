"""Cost of one admission decision (pytest-benchmark), memory and Redis.

Run: ``PYTHONPATH=. pytest benchmarks/test_bench_admission.py --benchmark-enable``
Async cases run a batch of ``BATCH`` decisions per round on one event loop (so the loop's own
start-up is not measured): divide their times by ``BATCH``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from tenantware.admission.core import FairCore, Ticket
from tenantware.admission.memory import MemorySeatStore
from tenantware.admission.redis import RedisSeatStore
from tenantware.backends.redis_support import connect_redis
from tenantware.context import SCOPE_KEY, RequestContext, RequestView, Usage
from tenantware.middleware.admission import AdmissionMiddleware
from tenantware.state import LiveConfig
from tests.conftest import redis_prefix, redis_url
from tests.support import make_config

__all__ = ["redis_prefix", "redis_url"]

BATCH = 100


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def batched(
    loop: asyncio.AbstractEventLoop, step: Callable[[], Coroutine[Any, Any, None]]
) -> Callable[[], None]:
    async def many() -> None:
        for _ in range(BATCH):
            await step()

    return lambda: loop.run_until_complete(many())


def test_core_fast_path(benchmark: Any) -> None:
    """Free seat, nobody waiting: one submit and one release of the scheduler core."""
    core = FairCore(64)

    def decide() -> None:
        ticket = Ticket("acme", 0.5, 500.0)
        core.submit(ticket)
        core.release(ticket, 400.0)

    benchmark(decide)


def test_core_saturated_dispatch(benchmark: Any) -> None:
    """Saturated pool, 20 backlogged tenants: a release picks the next tenant and band."""
    core = FairCore(8)
    names = [f"t{i}" for i in range(20)]
    held: list[Ticket] = []
    for i in range(400):
        ticket = Ticket(names[i % 20], 0.1 + (i % 5) / 10, 500.0, band=i % 3)
        core.submit(ticket)
        if ticket.granted:
            held.append(ticket)
    counter = 0

    def decide() -> None:
        nonlocal counter
        counter += 1
        done = held.pop(0)
        held.extend(core.release(done, 450.0))
        core.submit(Ticket(names[counter % 20], 0.5, 500.0, band=counter % 3))

    benchmark(decide)


def test_memory_store_fast_path(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    store = MemorySeatStore(64)

    async def step() -> None:
        ticket = Ticket("acme", 0.5, 500.0)
        await store.acquire(ticket)
        await store.release(ticket, 400.0)

    benchmark(batched(loop, step))


def test_middleware_fast_path(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    """The whole admission layer around an empty app (metrics included), per request."""
    live = LiveConfig(make_config(admission={"seats": 64}))

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        return None

    layer = AdmissionMiddleware(inner, live=live)
    tenant = live.current.registry.by_id("acme")
    view = RequestView(model="gpt-4.1", max_tokens=100)
    usage = Usage(input_tokens=10, output_tokens=20)
    headers = [(b"authorization", b"Bearer x"), (b"content-type", b"application/json")]

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    async def step() -> None:
        ctx = RequestContext("req")
        ctx.tenant = tenant
        ctx.view = view
        ctx.model = "gpt-4.1"
        ctx.usage = usage
        await layer({"type": "http", "headers": headers, SCOPE_KEY: ctx}, receive, send)

    benchmark(batched(loop, step))


def test_redis_fast_path(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_url: str, redis_prefix: str
) -> None:
    """One Lua call to acquire, one to release (a loopback round trip each)."""
    client = connect_redis(redis_url, timeout_s=2.0)
    store = RedisSeatStore(client, seats=64, prefix=redis_prefix)

    async def step() -> None:
        ticket = Ticket("acme", 0.5, 500.0)
        await store.acquire(ticket)
        await store.release(ticket, 400.0)

    benchmark(batched(loop, step))
    loop.run_until_complete(client.aclose())


def test_redis_saturated_dispatch(
    benchmark: Any, loop: asyncio.AbstractEventLoop, redis_url: str, redis_prefix: str
) -> None:
    """Saturated pool, 20 backlogged tenants: a release that dispatches plus a new arrival."""
    client = connect_redis(redis_url, timeout_s=2.0)
    store = RedisSeatStore(client, seats=8, prefix=redis_prefix, max_queue=10_000)
    names = [f"t{i}" for i in range(20)]
    held: list[Ticket] = []
    queued: list[Ticket] = []

    def settle() -> None:
        # Tickets granted by a release of this process are flagged at once.
        held.extend(t for t in queued if t.granted)
        queued[:] = [t for t in queued if not t.granted]

    async def fill() -> None:
        for i in range(400):
            ticket = Ticket(names[i % 20], 0.5, 500.0, band=i % 3)
            await store.acquire(ticket)
            (held if ticket.granted else queued).append(ticket)

    loop.run_until_complete(fill())
    counter = 0

    async def step() -> None:
        nonlocal counter
        counter += 1
        await store.release(held.pop(0), 450.0)
        ticket = Ticket(names[counter % 20], 0.5, 500.0, band=counter % 3)
        await store.acquire(ticket)
        (held if ticket.granted else queued).append(ticket)
        settle()

    benchmark(batched(loop, step))
    loop.run_until_complete(client.aclose())
