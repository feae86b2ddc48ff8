"""Cost of the breaker on the success path: what one healthy request pays for circuit breaking.

One round runs ``OPS`` requests' worth of breaker work inside one event loop (so loop start-up
is not measured); divide the reported time by ``OPS`` for the cost per request. Run with:

    pytest benchmarks/test_bench_breaker.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from tenantware.backends.redis_support import connect_redis
from tenantware.breaker import SUCCESS, BreakerBoard, MemoryBreakerStore, RedisBreakerStore
from tenantware.breaker.store import BreakerStore
from tenantware.config import parse_config
from tenantware.context import SCOPE_KEY, RequestContext
from tenantware.middleware.breaker import BreakerMiddleware
from tenantware.proxy.routing import Router
from tenantware.state import LiveConfig
from tenantware.types import Receive, Scope, Send
from tests.servers import redis_url_for_tests

OPS = 1000

CONFIG = parse_config(
    {
        "tenants": [{"id": "acme", "tier": "pro"}],
        "upstreams": [
            {"name": "primary", "base_url": "http://primary.test/v1", "models": ["gpt-4.1"]},
            {"name": "second", "base_url": "http://second.test/v1", "models": ["gpt-4.1"]},
            {"name": "backup", "base_url": "http://b.test/v1", "models": ["gemini-2.5-flash"]},
        ],
        "breaker": {"fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]}},
    }
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_url_for_tests() as url:
        yield url


def _run(
    benchmark: Any,
    make: Callable[[], Awaitable[Callable[[], Awaitable[None]]]],
    cleanup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        step = loop.run_until_complete(make())

        async def many() -> None:
            for _ in range(OPS):
                await step()

        loop.run_until_complete(many())  # warm caches and the Redis copy
        benchmark.pedantic(lambda: loop.run_until_complete(many()), rounds=20, iterations=1)
    finally:
        if cleanup is not None:
            loop.run_until_complete(cleanup())
        loop.close()


def _decision(store: BreakerStore) -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
    """Middleware check + proxy choice + both records, as one healthy proxied request does."""

    async def make() -> Callable[[], Awaitable[None]]:
        live = LiveConfig(CONFIG)
        board = BreakerBoard(CONFIG.breaker, store)
        router = Router(board)
        snapshot = live.current
        tenant = snapshot.registry.by_id("acme")
        tenant_key = board.tenant_key("acme")
        tenant_policy = board.tenant_policy

        async def step() -> None:
            chain = board.chain(snapshot, "gpt-4.1", tenant)
            if board.remote:
                await board.store.refresh((tenant_key,), tenant_policy)
                await board.refresh_chain(snapshot, chain)
            board.gate(tenant_key)
            board.chain_wait(snapshot, chain)
            pick = await router.pick(snapshot, chain, None)
            assert pick.deployment is not None
            await board.record(pick.deployment.key, SUCCESS)
            await board.record(tenant_key, SUCCESS, policy=tenant_policy)

        return step

    return make


def test_breaker_decision_memory(benchmark: Any) -> None:
    _run(benchmark, _decision(MemoryBreakerStore()))


def test_breaker_decision_redis(benchmark: Any, redis_url: str) -> None:
    prefix = f"twbench:{uuid.uuid4().hex[:8]}:"
    holder: dict[str, Any] = {}

    def make() -> Callable[[], Awaitable[Callable[[], Awaitable[None]]]]:
        async def build() -> Callable[[], Awaitable[None]]:
            client = connect_redis(redis_url, timeout_s=1.0)
            holder["client"] = client
            return await _decision(RedisBreakerStore(client, prefix=prefix))()

        return build

    async def close() -> None:
        await holder["client"].aclose()

    try:
        _run(benchmark, make(), close)
    finally:
        with redis.Redis.from_url(redis_url) as sync:
            keys = list(sync.scan_iter(match=f"{prefix}*"))
            if keys:
                sync.delete(*keys)


def test_breaker_middleware_memory(benchmark: Any) -> None:
    """The whole ``BreakerMiddleware`` around an app that answers 200 (minus the app)."""

    async def make() -> Callable[[], Awaitable[None]]:
        live = LiveConfig(CONFIG)
        board = BreakerBoard(CONFIG.breaker)
        tenant = live.current.registry.by_id("acme")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope[SCOPE_KEY].status = 200

        middleware = BreakerMiddleware(app, live=live, board=board)

        async def receive() -> Any:
            return {"type": "http.request"}

        async def send(message: Any) -> None:
            return None

        async def step() -> None:
            ctx = RequestContext("req_1")
            ctx.tenant = tenant
            ctx.model = "gpt-4.1"
            ctx.api_route = True
            await middleware({"type": "http", SCOPE_KEY: ctx}, receive, send)

        return step

    _run(benchmark, make)
