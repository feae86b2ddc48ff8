"""The cost of data segregation per request: the cache layer for a tenant with caching off,
a cache miss and a cache hit (memory store), and sealing a logged request.

Run: ``pytest benchmarks/test_bench_data.py -p no:cacheprovider --benchmark-enable``.
Each round calls the stack 500 times inside one event-loop run (direct ASGI calls, an inner
app that answers like the proxy); the figure per request is the round's time / 500. A layer's
cost is the stack with it minus the tenant layer alone over the same app.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from tenantware import KeyHasher, LiveConfig, TenantMiddleware, get_context, parse_config
from tenantware.cache import MemoryCacheStore
from tenantware.context import Outcome, Usage
from tenantware.crypto import EnvKeyProvider, KeyRing, MasterKeys, StaticKeyProvider
from tenantware.logbook import LoggedExchange, MemoryLogStore, seal_row
from tenantware.middleware.cache import CacheMiddleware
from tenantware.middleware.requestlog import RequestLogMiddleware
from tenantware.types import Message, Receive, Scope, Send

CALLS = 500
KEY = "sk-bench"
BODY = json.dumps(
    {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello there " * 40}]}
).encode()
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "model": "gpt-4.1",
        "choices": [{"message": {"role": "assistant", "content": "An answer. " * 60}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 120},
    }
).encode()
HEADERS = [(b"content-type", b"application/json")]
MASTER = MasterKeys({1: os.urandom(32)})


def _live(data: dict[str, Any]) -> LiveConfig:
    tenant = {"id": "acme", "keys": [{"id": "k", "hash": KeyHasher().hash(KEY)}], "data": data}
    return LiveConfig(parse_config({"tenants": [tenant]}))


async def _proxy_like(scope: Scope, receive: Receive, send: Send) -> None:
    ctx = get_context(scope)
    ctx.upstream = "fake"
    ctx.model_served = "gpt-4.1"
    ctx.usage = Usage(input_tokens=100, output_tokens=120)
    ctx.outcome = Outcome.OK
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def _stack(variant: str) -> Any:
    data: dict[str, Any] = {}
    if variant in ("cache-miss", "cache-hit"):
        # A miss every time: a quota no entry fits (the whole miss path: lookup, seal, put).
        data = {"cache_models": ["*"], "cache_quota_bytes": 0 if variant == "cache-miss" else 10**8}
    elif variant == "logged":
        data = {"log_requests": True}
    live = _live(data)
    ring = KeyRing(StaticKeyProvider(MASTER), MemoryLogStore())
    app: Any = _proxy_like
    if variant.startswith("cache"):
        app = CacheMiddleware(app, live=live, store=MemoryCacheStore(), keyring=ring)
    if variant == "logged":
        app = RequestLogMiddleware(app, store=_Discard(), keyring=ring)  # type: ignore[arg-type]
    return TenantMiddleware(app, live=live)


class _Discard(MemoryLogStore):
    """Seals and hands over every row, keeps none (memory stays flat over the rounds)."""

    async def append(self, row: Any, *, quota_bytes: int) -> bool:
        return True


def _runner(app: Any, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    scope_base = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {KEY}".encode())],
        "query_string": b"",
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Message) -> None:
        return None

    async def many() -> None:
        for _ in range(CALLS):
            await app(dict(scope_base), receive, send)

    def run() -> None:
        loop.run_until_complete(many())

    return run


@pytest.mark.parametrize(
    "variant", ["tenant-only", "cache-off", "cache-miss", "cache-hit", "logged"], ids=str
)
def test_bench_data_per_request(benchmark: Any, variant: str) -> None:
    app = _stack(variant)
    benchmark.extra_info["calls_per_round"] = CALLS
    loop = asyncio.new_event_loop()
    try:
        benchmark.pedantic(_runner(app, loop), rounds=10, warmup_rounds=1)
    finally:
        loop.close()


def test_bench_seal_one_logged_request(benchmark: Any) -> None:
    """Sealing alone: one exchange (1 KB request, 1 KB answer) into a log row."""
    keys = asyncio.run(KeyRing(StaticKeyProvider(MASTER), MemoryLogStore()).keys("acme"))
    assert keys is not None
    exchange = LoggedExchange(
        request_id="r", ts=1.0, path="/v1/chat/completions", model="gpt-4.1", status=200,
        outcome="ok", request=BODY, response=ANSWER,
    )  # fmt: skip
    benchmark(lambda: seal_row(keys, exchange, row_id="l", retention_s=86400.0))


def test_bench_derive_tenant_keys_once(benchmark: Any) -> None:
    """First use of a tenant's keys in a process (HKDF twice); later uses are a dict read."""
    os.environ["TW_BENCH_MASTER"] = base64.b64encode(MASTER.keys[1]).decode()

    async def derive() -> None:
        ring = KeyRing(EnvKeyProvider("TW_BENCH_MASTER"), MemoryLogStore())
        await ring.keys("acme")

    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(derive()))
    finally:
        loop.close()


@pytest.mark.parametrize("layer", ["bare-app", "cache-layer-caching-off"], ids=str)
def test_bench_cache_layer_alone_for_a_tenant_with_caching_off(benchmark: Any, layer: str) -> None:
    """The cache layer by itself (no tenant layer around it), over an app that returns at once:
    what a tenant that did not opt in pays for the layer being mounted."""
    from tenantware.context import SCOPE_KEY, RequestContext

    live = _live({})
    ctx = RequestContext("req")
    ctx.tenant = live.current.registry.by_id("acme")
    ctx.model = "gpt-4.1"
    ctx.body = BODY
    scope = {"type": "http", "path": "/v1/chat/completions", "headers": [], SCOPE_KEY: ctx}

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    ring = KeyRing(StaticKeyProvider(MASTER), MemoryLogStore())
    app: Any = bare
    if layer != "bare-app":
        app = CacheMiddleware(bare, live=live, store=MemoryCacheStore(), keyring=ring)

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        return None

    async def many() -> None:
        for _ in range(CALLS):
            await app(scope, receive, send)

    loop = asyncio.new_event_loop()
    try:
        benchmark.pedantic(lambda: loop.run_until_complete(many()), rounds=20, warmup_rounds=2)
    finally:
        loop.close()
