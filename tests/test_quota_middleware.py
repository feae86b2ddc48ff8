"""QuotaMiddleware in the stack: headers, OpenAI-shaped 429s, settle rules, the official SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest

from tenantware import Gateway, GatewayConfig, MemoryQuotaStore, get_context
from tenantware.context import Outcome, RequestContext
from tenantware.metering.pricing import cost_nanousd
from tenantware.quota import Plan, build_plan
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tenantware.types import Message, Receive, Scope, Send
from tests.support import (
    CHAT,
    KEYS,
    client_for,
    in_process_gateway,
    make_config,
    receive_body_then,
    tenant_entries,
)

pytestmark = pytest.mark.anyio


def quota_config(
    upstream_url: str = "http://upstream.test/v1",
    *,
    acme: dict[str, Any] | None = None,
    hobby: dict[str, Any] | None = None,
    **overrides: Any,
) -> GatewayConfig:
    """Both tenants on a tier without limits, with exactly the limits given."""
    tenants = tenant_entries()
    tenants[0].update(tier="plain", limits=acme or {})
    tenants[1].update(tier="plain", limits=hobby or {})
    return make_config(upstream_url, tenants=tenants, tiers={"plain": {}}, **overrides)


def backend_settings(backend: str, request: pytest.FixtureRequest, **extra: Any) -> dict[str, Any]:
    """``gateway`` settings of a memory (nothing) or Redis (this test's prefix) backend."""
    if backend != "redis":
        return {}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
        "redis_timeout_s": 5.0,
        **extra,
    }


def tenant_plan(gateway: Gateway, tenant: str = "acme", model: str = "gpt-4.1") -> Plan:
    view = gateway.live.current.registry.by_id(tenant)
    assert view is not None
    plan, _ = build_plan(gateway.config, tenant, view.limits, model, gateway.quota_store.prefix)
    assert plan is not None
    return plan


def capturing(gateway: Gateway, seen: list[RequestContext]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context(scope))
        await gateway.proxy(scope, receive, send)

    return app


async def test_every_response_carries_the_openai_ratelimit_headers() -> None:
    gateway, _ = in_process_gateway(
        config=quota_config(acme={"requests_per_minute": 10, "tokens_per_minute": 100_000})
    )
    seen: list[RequestContext] = []
    async with client_for(gateway.wrap(capturing(gateway, seen)), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50})
    assert response.status_code == 200
    headers = response.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"] == "6s"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    reserved = seen[0].estimated_prompt_tokens + 50
    assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - reserved)
    assert headers["x-ratelimit-reset-tokens"].endswith("s")


async def test_rate_limit_429_is_openai_shaped_with_the_exact_retry_after() -> None:
    gateway, fake = in_process_gateway(config=quota_config(acme={"requests_per_minute": 2}))
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[2]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "requests per minute" in error["message"]
    # 2/min: one request every 30 s; the third may go 30 s after the first (less the time
    # the first two took).
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 28_000 < retry_ms <= 30_000
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in refused.headers
    assert fake.stats.requests == 2


async def test_exhausted_budget_is_insufficient_quota_and_not_retried() -> None:
    gateway, fake = in_process_gateway(
        config=quota_config(acme={"daily_budget_usd": "0.00001"})  # 10,000 nano-USD
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5000})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_quota"
    assert response.json()["error"]["type"] == "insufficient_quota"
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers
    assert fake.stats.requests == 0


async def test_a_request_larger_than_the_token_limit_is_told_not_to_retry() -> None:
    gateway, _ = in_process_gateway(config=quota_config(acme={"tokens_per_minute": 100}))
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500})
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert "Request too large" in response.json()["error"]["message"]


async def test_settle_charges_exactly_the_actual_tokens_and_cost() -> None:
    gateway, _ = in_process_gateway(
        config=quota_config(
            acme={
                "tokens_per_minute": 1_000_000,
                "daily_budget_usd": "10",
                "monthly_budget_usd": "100",
                "concurrent_requests": 5,
            }
        )
    )
    seen: list[RequestContext] = []
    app = gateway.wrap(capturing(gateway, seen))
    async with client_for(app, KEYS["acme"]) as client:
        for max_tokens in (3, 7, 11):
            response = await client.post(
                "/v1/chat/completions", json={**CHAT, "max_tokens": max_tokens}
            )
            assert response.status_code == 200
    price = gateway.live.current.catalogue.price("gpt-4.1")
    assert price is not None
    tokens = cost = 0
    for ctx in seen:
        assert ctx.usage is not None
        assert not ctx.usage.estimated
        tokens += ctx.usage.input_tokens + ctx.usage.output_tokens
        expected = cost_nanousd(
            price, ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.cached_tokens
        )
        assert ctx.cost_nanousd == expected
        cost += expected
    assert await gateway.quota_store.usage(tenant_plan(gateway)) == [tokens, 0, cost, cost]


async def test_a_failed_upstream_request_is_refunded_whole() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(failure_rate=1.0))
    gateway, _ = in_process_gateway(
        fake,
        quota_config(
            acme={"tokens_per_minute": 100_000, "daily_budget_usd": "1", "concurrent_requests": 1}
        ),
    )
    seen: list[RequestContext] = []
    async with client_for(gateway.wrap(capturing(gateway, seen)), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500
    assert seen[0].outcome == Outcome.UPSTREAM_ERROR
    assert seen[0].cost_nanousd == 0
    assert await gateway.quota_store.usage(tenant_plan(gateway)) == [0, 0, 0]


async def test_an_app_that_raises_is_refunded_and_frees_its_slot() -> None:
    config = quota_config(acme={"tokens_per_minute": 100_000, "concurrent_requests": 1})
    gateway = Gateway(config)

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async with client_for(gateway.wrap(broken), KEYS["acme"]) as client:
        for _ in range(2):  # a leaked slot would turn the second into a 429
            with pytest.raises(RuntimeError, match="boom"):
                await client.post("/v1/chat/completions", json=CHAT)
    assert await gateway.quota_store.usage(tenant_plan(gateway)) == [0, 0]


async def test_concurrent_requests_over_the_limit_are_refused() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(latency_s=0.3))
    gateway, _ = in_process_gateway(fake, quota_config(acme={"concurrent_requests": 2}))
    responses: list[httpx.Response] = []
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:

        async def one() -> None:
            responses.append(await client.post("/v1/chat/completions", json=CHAT))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(one)
        assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "requests"
        assert "concurrent requests" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        # The same x-ratelimit-* headers as a rate refusal: the binding requests limit.
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"] == "1s"
        # All slots came back: one more goes through.
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_global_limits_are_shared_by_all_tenants_and_a_refusal_undoes_the_tenant(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Memory and one Redis server decide both scopes in one call (a merged plan)."""
    gateway_settings = backend_settings(backend, request)
    gateway, fake = in_process_gateway(
        config=quota_config(
            acme={"requests_per_minute": 100},
            hobby={"requests_per_minute": 100},
            quota={"global_limits": {"requests_per_minute": 3}},
            gateway=gateway_settings,
        )
    )
    assert gateway.quota_store.single_node
    chat = {**CHAT, "model": "gemini-2.5-flash"}
    app = gateway.asgi_app()
    async with client_for(app, KEYS["acme"]) as acme, client_for(app, KEYS["hobby"]) as hobby:
        codes = [
            (await acme.post("/v1/chat/completions", json=chat)).status_code,
            (await hobby.post("/v1/chat/completions", json=chat)).status_code,
            (await acme.post("/v1/chat/completions", json=chat)).status_code,
        ]
        refused = await hobby.post("/v1/chat/completions", json=chat)
    try:
        assert codes == [200, 200, 200]
        assert refused.status_code == 429
        assert "the gateway's shared requests per minute" in refused.json()["error"]["message"]
        # The headers stay the tenant's own limit, not the shared one.
        assert refused.headers["x-ratelimit-limit-requests"] == "100"
        assert fake.stats.requests == 3
        # hobby's own request counter only holds its one admitted request.
        plan = tenant_plan(gateway, "hobby", "gemini-2.5-flash")
        assert await gateway.quota_store.usage(plan) == [1]
    finally:
        await gateway.aclose()


async def test_requests_of_tenants_without_limits_pass_untouched() -> None:
    gateway, _ = in_process_gateway(config=quota_config())
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert not any(h.startswith("x-ratelimit") for h in response.headers)


@pytest.fixture
def streaming_fake() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=50, chunk_delay_s=0.01))
    with serve_in_thread(fake) as url:
        yield fake, url


async def test_a_stream_cut_by_the_client_settles_to_what_was_produced(
    streaming_fake: tuple[FakeUpstream, str],
) -> None:
    _, url = streaming_fake
    gateway = Gateway(
        quota_config(
            url + "/v1",
            acme={"tokens_per_minute": 100_000, "daily_budget_usd": "1", "concurrent_requests": 1},
        )
    )
    seen: list[RequestContext] = []
    app = gateway.wrap(capturing(gateway, seen))
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 50}).encode()
    disconnect = anyio.Event()
    chunks: list[bytes] = []

    async def disconnected() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    receive = receive_body_then(body, disconnected)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) == 4:
                disconnect.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {KEYS['acme']}".encode())],
        "query_string": b"",
    }
    try:
        with anyio.fail_after(10):
            await app(scope, receive, send)
    finally:
        await gateway.proxy.aclose()
    ctx = seen[0]
    assert ctx.outcome == Outcome.CLIENT_DISCONNECTED
    assert ctx.usage is not None
    assert 0 < ctx.usage.output_tokens < 50
    price = gateway.live.current.catalogue.price("gpt-4.1")
    assert price is not None
    cost = cost_nanousd(price, ctx.usage.input_tokens, ctx.usage.output_tokens)
    assert ctx.cost_nanousd == cost
    total = ctx.usage.input_tokens + ctx.usage.output_tokens
    assert await gateway.quota_store.usage(tenant_plan(gateway)) == [total, 0, cost]


def test_the_official_sdk_raises_rate_limit_error_and_honours_retry_after() -> None:
    fake = FakeUpstream()
    with serve_in_thread(fake) as upstream_url:
        gateway = Gateway(quota_config(upstream_url + "/v1", acme={"requests_per_second": 1}))
        with (
            serve_in_thread(gateway.asgi_app(), lifespan="on") as url,
            openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"], max_retries=0) as no_retry,
            openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"], max_retries=1) as retrying,
        ):
            chat = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
            no_retry.chat.completions.create(**chat)  # type: ignore[call-overload]
            with pytest.raises(openai.RateLimitError) as caught:
                no_retry.chat.completions.create(**chat)  # type: ignore[call-overload]
            assert caught.value.code == "rate_limit_exceeded"
            assert caught.value.response.headers["x-ratelimit-limit-requests"] == "1"

            time.sleep(1.0)
            retrying.chat.completions.create(**chat)  # type: ignore[call-overload]
            started = time.monotonic()
            completion = retrying.chat.completions.create(**chat)  # type: ignore[call-overload]
            waited = time.monotonic() - started
    assert completion.choices[0].message.content
    # The SDK slept for retry-after-ms (about one emission interval), then got through.
    assert 0.5 < waited < 5.0
    assert fake.stats.requests == 3


def test_memory_store_is_the_default_without_redis() -> None:
    gateway = Gateway(make_config())
    assert isinstance(gateway.quota_store, MemoryQuotaStore)
    assert gateway.quota_store is gateway.quota_store


def test_the_guide_quota_example_is_a_valid_config() -> None:
    import re
    from pathlib import Path

    from tenantware import parse_config

    text = (Path(__file__).parent.parent / "docs" / "quotas.md").read_text()
    section = text[text.index("## Where state lives") :]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match is not None
    config = parse_config(match[1])
    assert config.quota.on_store_failure == {"requests": "local", "budget": "closed"}
    assert config.quota.tenant_model_limits["acme"]["gpt-4.1"].tokens_per_minute == 300_000


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_after_a_drain_of_mixed_outcomes_charged_equals_actual(
    backend: str, request: pytest.FixtureRequest
) -> None:
    gateway_settings = backend_settings(backend, request, on_store_failure="closed")
    fake = FakeUpstream(FakeUpstreamConfig(failure_rate=0.3, latency_s=0.01), seed=11)
    gateway, _ = in_process_gateway(
        fake,
        quota_config(
            acme={
                "tokens_per_minute": 10_000_000,
                "daily_budget_usd": "100",
                "monthly_budget_usd": "1000",
                "concurrent_requests": 100,
            },
            gateway=gateway_settings,
            breaker={"max_attempts": 1},  # each upstream failure reaches the client
        ),
    )
    seen: list[RequestContext] = []
    app = gateway.wrap(capturing(gateway, seen))
    statuses: list[int] = []
    try:
        async with client_for(app, KEYS["acme"]) as client:

            async def one(i: int) -> None:
                body = {
                    **CHAT,
                    "max_tokens": 5 + i % 13,
                    "model": ["gpt-4.1", "deepseek-v3.2"][i % 2],
                }
                response = await client.post("/v1/chat/completions", json=body)
                statuses.append(response.status_code)

            async with anyio.create_task_group() as group:
                for i in range(40):
                    group.start_soon(one, i)
        assert 200 in statuses
        assert 500 in statuses
        tokens = cost = 0
        for ctx in seen:
            assert ctx.cost_nanousd is not None
            cost += ctx.cost_nanousd
            if ctx.outcome == Outcome.OK:
                assert ctx.usage is not None
                tokens += ctx.usage.input_tokens + ctx.usage.output_tokens
            else:
                assert ctx.cost_nanousd == 0
        usage = await gateway.quota_store.usage(tenant_plan(gateway))
        assert usage == [tokens, 0, cost, cost]
    finally:
        await gateway.aclose()


async def test_a_custom_prompt_estimator_sizes_the_reservation() -> None:
    config = quota_config(acme={"tokens_per_minute": 4_000})
    fake = FakeUpstream()
    gateway, _ = in_process_gateway(fake, config)
    gateway = Gateway(
        config,
        upstream_client=gateway.proxy.client,
        estimator=lambda body, view: 5_000,
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
    assert response.status_code == 429
    assert "requested 5010" in response.json()["error"]["message"]
