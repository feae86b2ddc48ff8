"""The whole stack end to end: every layer together, over sockets, as clients see it.

The standalone gateway (``Gateway(config).asgi_app()``, lifespan on) and the fake upstream
each run on a loopback port; requests come from the official ``openai`` SDK and from httpx.
After each scenario the books of every layer are compared: the quota store's counters, the
ledger, the fake upstream's own counts and the admission seats.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
import structlog.testing

from tenantware import Gateway, KeyHasher, parse_config
from tenantware.admission.pools import AdmissionPools
from tenantware.backends.redis_support import connect_redis
from tenantware.breaker.circuit import CLOSED
from tenantware.config import GatewayConfig
from tenantware.context import Outcome
from tenantware.errors import GatewayError, send_error
from tenantware.metering.ledger.base import MemoryLedger
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.pricing import cost_nanousd
from tenantware.metrics import REGISTRY
from tenantware.quota.plan import (
    KIND_CONCURRENCY,
    KIND_SPEND,
    KIND_TOKENS,
    build_plan,
)
from tenantware.quota.redis import RedisQuotaStore
from tenantware.reload import reload_from
from tenantware.stores import open_stores
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tenantware.types import Receive, Scope, Send
from tests.servers import find_free_port
from tests.support import CHAT, KEYS, client_for, tenant_entries

ADMIN_KEY = "sk-test-admin-stack"
SERVED = "x-tenantware-model"
SMALL_CHAT = {**CHAT, "max_tokens": 20}


def stack_data(upstream: str, **overrides: Any) -> dict[str, Any]:
    """acme: enterprise with token, budget and concurrency limits; hobby: free, gemini only."""
    tenants = tenant_entries()
    tenants[0]["limits"] = {
        "tokens_per_day": 10_000_000,
        "daily_budget_usd": 100,
        "concurrent_requests": 64,
    }
    tenants[1]["limits"] = {"tokens_per_day": 1_000_000, "concurrent_requests": 16}
    data: dict[str, Any] = {
        "tenants": tenants,
        "upstreams": [
            {
                "name": "fake",
                "base_url": upstream + "/v1",
                "models": ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
                "timeout_s": 5,
            }
        ],
        "aliases": {"gpt4": "gpt-4.1"},
        "admission": {"seats": 8},
        "metering": {
            "ledger_url": "memory://",
            "request_log": False,
            "flush_interval_s": 0.02,
            "admin_key_hash": KeyHasher().hash(ADMIN_KEY),
        },
    }
    data.update(overrides)
    return data


def stack_config(upstream: str, **overrides: Any) -> GatewayConfig:
    return parse_config(stack_data(upstream, **overrides))


@dataclass
class Stack:
    gateway: Gateway
    url: str
    fake: FakeUpstream
    upstream: str
    #: SDK clients made by the test, closed when the stack stops (an unclosed connection
    #: pool warns whenever it is collected, in whichever test that happens).
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def ledger(self) -> MemoryLedger:
        ledger = self.gateway.ledger
        assert isinstance(ledger, MemoryLedger)
        return ledger

    def http(self, key: str | None = KEYS["acme"]) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def sdk(self, key: str = KEYS["acme"]) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=10)
        self.clients.append(client)
        return client

    def records(self, count: int, *, timeout_s: float = 5.0) -> list[UsageRecord]:
        """The ledger's records once ``count`` of them are written (settled and flushed)."""
        deadline = time.monotonic() + timeout_s
        while len(self.ledger.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        records = sorted(self.ledger.records.values(), key=lambda r: r.ts)
        assert len(records) == count, records
        return records

    def record_of(self, request_id: str) -> UsageRecord:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for record in list(self.ledger.records.values()):
                if record.request_id == request_id:
                    return record
            time.sleep(0.01)
        raise AssertionError(f"no ledger record for {request_id}")

    def quota(self, tenant: str, model: str | None = None) -> dict[str, int]:
        """The tenant's quota counters: tokens today, spend today (nano-USD), slots held."""
        snapshot = self.gateway.live.current
        view = snapshot.registry.by_id(tenant)
        assert view is not None
        plan, _ = build_plan(
            snapshot.config, tenant, view.limits, model, self.gateway.quota_store.prefix
        )
        assert plan is not None
        values = anyio.run(self._quota_usage, plan)
        out = {}
        for limit, value in zip(plan.limits, values, strict=True):
            name = {KIND_TOKENS: "tokens", KIND_SPEND: "spend", KIND_CONCURRENCY: "slots"}
            if limit.kind in name:
                out[name[limit.kind]] = value
        return out

    async def _quota_usage(self, plan: Any) -> list[int]:
        settings = self.gateway.config.gateway
        if not settings.redis_url:
            return await self.gateway.quota_store.usage(plan)
        # The gateway's Redis client belongs to its server's event loop: use another one.
        redis = connect_redis(settings.redis_url, timeout_s=2.0)
        try:
            return await RedisQuotaStore(redis, prefix=settings.redis_prefix).usage(plan)
        finally:
            await redis.aclose()

    async def _admission_state(self) -> dict[str, Any]:
        settings = self.gateway.config.gateway
        if not settings.redis_url:
            return await self.gateway.admission.state()
        stores = open_stores(settings.redis_url, prefix=settings.redis_prefix, timeout_s=2.0)
        try:
            pools = AdmissionPools(self.gateway.config.admission, stores.seat_store)
            return await pools.state()
        finally:
            await stores.aclose()

    def seats(self) -> dict[str, Any]:
        state = anyio.run(self._admission_state)
        return {name: (pool["in_use"], pool["waiting"]) for name, pool in state.items()}

    def wait_upstream_idle(self) -> None:
        deadline = time.monotonic() + 5.0
        while self.fake.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.fake.stats.in_flight == 0


@contextlib.contextmanager
def running_stack(
    fake_config: FakeUpstreamConfig | None = None,
    *,
    app: Callable[[Gateway], Any] | None = None,
    **overrides: Any,
) -> Iterator[Stack]:
    fake = FakeUpstream(fake_config)
    with serve_in_thread(fake) as upstream:
        gateway = Gateway(stack_config(upstream, **overrides))
        served = app(gateway) if app is not None else gateway.asgi_app()
        with serve_in_thread(served, lifespan="on") as url:
            stack = Stack(gateway, url, fake, upstream)
            try:
                yield stack
            finally:
                for client in stack.clients:
                    client.close()


def backend_settings(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``[gateway]`` for the stores of every layer: memory, or the test's Redis and prefix."""
    if backend == "memory":
        return {}
    return {
        "redis_url": request.getfixturevalue("redis_url"),
        "redis_prefix": request.getfixturevalue("redis_prefix"),
        "redis_timeout_s": 1.0,
    }


def price_cost(stack: Stack, model: str, usage: dict[str, Any]) -> int:
    price = stack.gateway.live.current.catalogue.price(model)
    assert price is not None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return cost_nanousd(price, usage["prompt_tokens"], usage["completion_tokens"], cached)


def assert_settled_as_recorded(stack: Stack, record: UsageRecord) -> None:
    """Quota charged what the ledger says, at the served model's price; every seat is back."""
    price = stack.gateway.live.current.catalogue.price(record.model_served)
    assert price is not None
    assert record.cost_nanousd == cost_nanousd(
        price, record.input_tokens, record.output_tokens, record.cached_tokens
    )
    assert stack.quota(record.tenant) == {
        "tokens": record.input_tokens + record.output_tokens,
        "spend": record.cost_nanousd,
        "slots": 0,
    }
    assert stack.seats() == {"*": (0, 0)}


# -- one request through every layer ---------------------------------------------------------


def test_one_request_passes_every_layer_and_every_book_agrees() -> None:
    with running_stack() as stack:
        raw = stack.sdk().chat.completions.with_raw_response.create(
            model="gpt4", messages=[{"role": "user", "content": "Hello there"}], max_tokens=50
        )
        completion = raw.parse()
        headers = raw.headers
        request_id = headers["x-request-id"]
        assert request_id.startswith("req_")
        for name in ("limit", "remaining", "reset"):
            assert headers[f"x-ratelimit-{name}-requests"]
            assert headers[f"x-ratelimit-{name}-tokens"]
        assert headers[SERVED] == "gpt-4.1"
        usage = completion.usage
        assert usage is not None
        expected = price_cost(stack, "gpt-4.1", usage.model_dump())
        assert expected > 0

        record = stack.record_of(request_id)
        assert record.outcome == Outcome.OK
        assert record.status == 200
        assert (record.tenant, record.key_id) == ("acme", "acme-1")
        assert (record.model_requested, record.model_served) == ("gpt-4.1", "gpt-4.1")
        assert (record.input_tokens, record.output_tokens) == (
            usage.prompt_tokens,
            usage.completion_tokens,
        )
        assert record.cost_nanousd == record.charged_nanousd == expected
        assert record.queue_wait_s == 0.0  # seats were free: admitted at once
        assert record.upstream == "fake"
        assert not record.estimated
        upstream_record = stack.fake.stats.by_request_id[request_id]
        assert upstream_record.completion_tokens == usage.completion_tokens
        assert stack.quota("acme") == {"tokens": usage.total_tokens, "spend": expected, "slots": 0}
        assert stack.seats() == {"*": (0, 0)}

        with stack.http(None) as client:
            denied = client.get("/metrics")
            assert denied.status_code == 401
            metrics = client.get("/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert metrics.status_code == 200
        lines = [line for line in metrics.text.splitlines() if 'tenant="acme"' in line]
        assert any(line.startswith("tenantware_requests_total") for line in lines), lines
        assert any(line.startswith("tenantware_cost_nanousd_total") for line in lines), lines


# -- fallback --------------------------------------------------------------------------------


def test_fallback_charges_the_served_model_and_respects_allowed_models() -> None:
    breaker = {
        "max_attempts": 2,
        "fallbacks": {
            "gpt-4.1": ["claude-sonnet-4.5"],
            "gemini-2.5-flash": ["gpt-4.1"],
        },
    }
    with running_stack(breaker=breaker) as stack:
        stack.fake.config.fail_next = [500]
        with stack.http() as client:
            response = client.post("/v1/chat/completions", json=SMALL_CHAT)
        assert response.status_code == 200
        assert response.headers[SERVED] == "claude-sonnet-4.5"
        usage = response.json()["usage"]
        expected = price_cost(stack, "claude-sonnet-4.5", usage)
        assert expected != price_cost(stack, "gpt-4.1", usage)
        record = stack.record_of(response.headers["x-request-id"])
        assert (record.model_requested, record.model_served) == ("gpt-4.1", "claude-sonnet-4.5")
        assert record.cost_nanousd == expected
        assert stack.quota("acme") == {
            "tokens": usage["total_tokens"],
            "spend": expected,
            "slots": 0,
        }

        # hobby may use gemini only: its fallback to gpt-4.1 is not taken.
        stack.fake.config.fail_next = [500, 500]
        with stack.http(KEYS["hobby"]) as client:
            failed = client.post(
                "/v1/chat/completions", json={**SMALL_CHAT, "model": "gemini-2.5-flash"}
            )
        assert failed.status_code == 500
        assert failed.headers[SERVED] == "gemini-2.5-flash"
        assert failed.json()["error"]
        record = stack.record_of(failed.headers["x-request-id"])
        assert record.model_served == "gemini-2.5-flash"
        assert record.outcome == Outcome.UPSTREAM_ERROR
        assert record.cost_nanousd == 0
        assert stack.quota("hobby")["tokens"] == 0
        assert stack.quota("hobby")["slots"] == 0


# -- rejections ------------------------------------------------------------------------------


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert response.headers["x-request-id"]
    return dict(error)


def test_quota_rejection_is_recorded_and_reaches_neither_admission_nor_upstream() -> None:
    with running_stack() as stack:
        sdk = stack.sdk(KEYS["hobby"])
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(
                model="gemini-2.5-flash",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2_000_000,
            )
        response = caught.value.response
        _assert_openai_error(response, 429, "rate_limit_exceeded")
        assert response.headers["x-should-retry"] == "false"
        assert response.headers["x-ratelimit-remaining-tokens"]
        record = stack.record_of(response.headers["x-request-id"])
        assert record.outcome == Outcome.REJECTED_QUOTA
        assert record.status == 429
        assert record.cost_nanousd == 0
        assert record.input_tokens == record.output_tokens == 0
        assert stack.fake.stats.requests == 0
        state = anyio.run(stack._admission_state)
        assert "hobby" not in state["*"]["tenants"]  # admission never saw it
        assert stack.quota("hobby") == {"tokens": 0, "slots": 0}


def test_queue_full_and_queue_timeout_release_the_quota_reservation() -> None:
    tiers = {"free": {"weight": 0.15, "max_priority": "bulk", "max_queue_wait_s": 0.8}}
    admission = {"seats": 1, "max_queue_per_tenant": 1}
    fake = FakeUpstreamConfig(latency_s=1.6)
    with running_stack(fake, tiers=tiers, admission=admission) as stack:
        body = {**SMALL_CHAT, "model": "gemini-2.5-flash"}

        def post(key: str) -> httpx.Response:
            with stack.http(key) as client:
                return client.post("/v1/chat/completions", json=body)

        with ThreadPoolExecutor(3) as pool:
            holder = pool.submit(post, KEYS["acme"])
            deadline = time.monotonic() + 5
            while stack.seats()["*"][0] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            waiter = pool.submit(post, KEYS["hobby"])
            while stack.seats()["*"][1] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            full = post(KEYS["hobby"])
            timed_out = waiter.result(timeout=10)
            held = holder.result(timeout=10)

        _assert_openai_error(full, 429, "rate_limit_exceeded")
        assert full.headers["retry-after"] == "1"
        assert full.headers["x-should-retry"] == "true"
        _assert_openai_error(timed_out, 503, "queue_timeout")
        assert timed_out.headers["x-should-retry"] == "true"
        assert held.status_code == 200
        for response in (full, timed_out):
            # The quota layer's headers ride on every answer of a request it admitted.
            assert response.headers["x-ratelimit-limit-tokens"]
            record = stack.record_of(response.headers["x-request-id"])
            assert record.outcome == Outcome.REJECTED_QUEUE
            assert record.cost_nanousd == 0
            assert record.output_tokens == 0
        assert stack.record_of(timed_out.headers["x-request-id"]).queue_wait_s >= 0.7
        assert stack.quota("hobby") == {"tokens": 0, "slots": 0}
        assert stack.seats() == {"*": (0, 0)}
        assert stack.fake.stats.requests == 1


def test_breaker_open_is_recorded_and_refunds_the_reservation() -> None:
    breaker = {"max_attempts": 1, "deployment": {"consecutive_failures": 2}}
    with running_stack(breaker=breaker) as stack:
        stack.fake.config.fail_next = [500, 500]
        body = {**SMALL_CHAT, "model": "deepseek-v3.2"}
        with stack.http() as client:
            for _ in range(2):
                assert client.post("/v1/chat/completions", json=body).status_code == 500
            response = client.post("/v1/chat/completions", json=body)
        _assert_openai_error(response, 503, "circuit_open")
        assert float(response.headers["retry-after"]) > 0
        assert response.headers["x-ratelimit-limit-tokens"] == "2000000"
        record = stack.record_of(response.headers["x-request-id"])
        assert record.outcome == Outcome.BREAKER_OPEN
        assert record.cost_nanousd == 0
        assert stack.fake.stats.requests == 2
        assert stack.quota("acme") == {"tokens": 0, "spend": 0, "slots": 0}
        assert stack.seats() == {"*": (0, 0)}


# -- disconnect ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_client_disconnect_mid_stream_settles_every_layer(
    backend: str, request: pytest.FixtureRequest
) -> None:
    fake = FakeUpstreamConfig(stream_chunks=200, chunk_delay_s=0.02)
    with running_stack(fake, gateway=backend_settings(backend, request)) as stack:
        with stack.http() as client:
            body = {**CHAT, "stream": True, "max_tokens": 500}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                chunks = 0
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                    if chunks >= 5:
                        break
        record = stack.record_of(request_id)
        stack.wait_upstream_idle()
        produced = stack.fake.stats.by_request_id[request_id]
        assert produced.outcome != "completed"
        assert 3 <= produced.completion_tokens < 200
        assert record.outcome == Outcome.CLIENT_DISCONNECTED
        assert record.estimated
        assert record.stream
        assert record.output_tokens > 0
        assert record.input_tokens > 0
        assert_settled_as_recorded(stack, record)


# -- drain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_drain_every_book_agrees_exactly_per_tenant(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Quota, admission and breaker state on one backend (memory, or all three on Redis)."""
    fake = FakeUpstreamConfig(failure_rate=0.2, stream_chunks=8, chunk_delay_s=0.002)
    breaker = {"max_attempts": 1, "deployment": {"consecutive_failures": 1000}}
    tenants = stack_data("")["tenants"]
    # hobby: room for a few of its requests per day only.
    tenants[1]["limits"] = {"tokens_per_day": 100, "concurrent_requests": 4}
    with running_stack(
        fake,
        breaker=breaker,
        admission={"seats": 3},
        tenants=tenants,
        gateway=backend_settings(backend, request),
    ) as stack:

        def one(i: int) -> int:
            key = KEYS["hobby"] if i % 3 == 0 else KEYS["acme"]
            model = (
                "gemini-2.5-flash" if key == KEYS["hobby"] else ("gpt-4.1", "deepseek-v3.2")[i % 2]
            )
            body = {**CHAT, "model": model, "max_tokens": 40, "stream": i % 2 == 0}
            with stack.http(key) as client:
                return client.post("/v1/chat/completions", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(36), timeout=30))
        assert 200 in statuses
        assert 429 in statuses
        stack.wait_upstream_idle()
        records = stack.records(36)
        upstream = stack.fake.stats.by_request_id
        for tenant in ("acme", "hobby"):
            mine = [r for r in records if r.tenant == tenant]
            ledger_tokens = sum(r.input_tokens + r.output_tokens for r in mine)
            upstream_tokens = sum(
                upstream[r.request_id].prompt_tokens + upstream[r.request_id].completion_tokens
                for r in mine
                if r.request_id in upstream and upstream[r.request_id].status == 200
            )
            counters = stack.quota(tenant)
            assert counters["tokens"] == ledger_tokens == upstream_tokens, tenant
            assert counters["slots"] == 0
            if "spend" in counters:
                assert counters["spend"] == sum(r.cost_nanousd for r in mine)
        outcomes = {r.outcome for r in records}
        assert Outcome.REJECTED_QUOTA in outcomes
        assert Outcome.UPSTREAM_ERROR in outcomes
        assert stack.seats() == {"*": (0, 0)}
        assert stack.fake.stats.requests == sum(1 for r in records if r.upstream)


# -- reload ----------------------------------------------------------------------------------


def test_reload_of_limits_and_revoked_key_applies_to_the_next_request(tmp_path: Path) -> None:
    with running_stack() as stack:
        with stack.http(KEYS["hobby"]) as hobby, stack.http() as acme:
            body = {**SMALL_CHAT, "model": "gemini-2.5-flash"}
            assert hobby.post("/v1/chat/completions", json=body).status_code == 200
            assert acme.post("/v1/chat/completions", json=SMALL_CHAT).status_code == 200

            data = stack_data(stack.upstream)
            data["tenants"][1]["limits"] = {"requests_per_day": 1}
            data["tenants"][0]["keys"][0]["revoked"] = True
            path = tmp_path / "tenantware.json"
            path.write_text(json.dumps(data))
            assert reload_from(stack.gateway.live, path)

            revoked = acme.post("/v1/chat/completions", json=SMALL_CHAT)
            _assert_openai_error(revoked, 401, "invalid_api_key")
            assert hobby.post("/v1/chat/completions", json=body).status_code == 200
            limited = hobby.post("/v1/chat/completions", json=body)
            _assert_openai_error(limited, 429, "rate_limit_exceeded")
            assert limited.headers["x-ratelimit-limit-requests"] == "1"
        # An unknown or revoked key has no tenant to bill: the ledger has no record of it.
        records = stack.records(4)
        assert [r.outcome for r in records][-2:] == [
            Outcome.OK,
            Outcome.REJECTED_QUOTA,
        ]
        assert stack.fake.stats.requests == 3


# -- the examples ----------------------------------------------------------------------------


def _starlette(gateway: Gateway) -> Any:
    from examples.starlette_app.app import create_app

    return create_app(gateway)


def _fastapi(gateway: Gateway) -> Any:
    from examples.fastapi_app.app import create_app

    return create_app(gateway)


def _fastapi_in_stack_order(gateway: Gateway) -> Any:
    """The pitfall the FastAPI example avoids: ``add_middleware`` in the stack's order."""
    from fastapi import FastAPI

    app = FastAPI(lifespan=gateway.lifespan)
    app.mount("/v1", gateway.proxy)
    for layer in gateway.middleware():
        app.add_middleware(layer.cls, *layer.args, **layer.kwargs)
    return app


@pytest.mark.parametrize("factory", [_starlette, _fastapi], ids=["starlette", "fastapi"])
def test_examples_run_the_whole_stack_for_the_same_key(factory: Callable[[Gateway], Any]) -> None:
    with running_stack(app=factory) as stack:
        with stack.http() as client:
            whoami = client.get("/v1/whoami")
            assert whoami.json()["tenant"] == "acme"
            response = client.post("/v1/chat/completions", json=SMALL_CHAT)
        assert response.status_code == 200
        # Quota ran inside the tenant layer (it knew the tenant), metering outside quota
        # (the record carries the cost quota settled).
        assert response.headers["x-ratelimit-limit-tokens"]
        usage = response.json()["usage"]
        record = stack.record_of(response.headers["x-request-id"])
        assert record.cost_nanousd == price_cost(stack, "gpt-4.1", usage)
        assert stack.quota("acme")["tokens"] == usage["total_tokens"]
        assert stack.quota("acme")["slots"] == 0


def test_stack_in_the_wrong_order_fails_loudly_instead_of_skipping_policy() -> None:
    with running_stack(app=_fastapi_in_stack_order) as stack:
        with stack.http() as client:
            response = client.post("/v1/chat/completions", json=SMALL_CHAT)
        # The tenant layer ends up innermost: the policy layers outside it see no context.
        # They refuse (500) rather than let the request through unmetered and unlimited.
        assert response.status_code == 500
        assert "x-ratelimit-limit-tokens" not in response.headers
        assert stack.fake.stats.requests == 0


# -- secrets ---------------------------------------------------------------------------------


def test_no_key_reaches_logs_errors_or_the_ledger(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_key = "sk-upstream-secret-4242"
    monkeypatch.setenv("TW_STACK_UPSTREAM_KEY", upstream_key)
    wrong = "sk-test-wrong-guess-777"
    fake = FakeUpstreamConfig(require_api_key=upstream_key)
    metering = {"ledger_url": "memory://", "request_log": True, "flush_interval_s": 0.02}
    with running_stack(fake, metering=metering) as stack:
        upstreams = stack_data(stack.upstream)["upstreams"]
        upstreams[0]["api_key_env"] = "TW_STACK_UPSTREAM_KEY"
        config = stack_config(stack.upstream, upstreams=upstreams, metering=metering)
        caplog.set_level("DEBUG")
        with structlog.testing.capture_logs() as logs:
            stack.gateway.live.replace(config)
            seen: list[str] = []
            with stack.http() as client:
                ok = client.post("/v1/chat/completions", json=SMALL_CHAT)
                assert ok.status_code == 200
                stream = client.post("/v1/chat/completions", json={**SMALL_CHAT, "stream": True})
                seen.append(stream.text)
                stack.fake.config.fail_next = [500]
                seen.append(client.post("/v1/chat/completions", json=SMALL_CHAT).text)
                # The upstream refuses the gateway's key: the tenant must not learn it either.
                stack.fake.config.require_api_key = "sk-some-other-key"
                refused = client.post("/v1/chat/completions", json=SMALL_CHAT)
                seen.append(refused.text + str(refused.headers))
            with stack.http(wrong) as client:
                denied = client.post("/v1/chat/completions", json=SMALL_CHAT)
                assert denied.status_code == 401
                seen.append(denied.text + str(denied.headers))
            records = stack.records(4)
        assert any(entry.get("event") == "request" for entry in logs), logs
        texts = [str(logs), caplog.text, str(records), *seen]
        for secret in (upstream_key, KEYS["acme"], wrong, "sk-some-other-key"):
            for text in texts:
                assert secret not in text


# -- an inner app that raises ----------------------------------------------------------------


@pytest.mark.anyio
async def test_inner_app_raising_a_client_error_is_not_an_app_failure() -> None:
    """A ``GatewayError`` raised by the app is judged by its status, not as a crash (500), and
    answered inside the quota layer (with its headers), like the layers' own refusals."""
    calls = 0

    async def picky_app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        raise GatewayError(400, "This app wants a system message.", param="messages")

    data = stack_data("http://upstream.test")
    data["upstreams"][0]["models"] = ["gpt-4.1"]  # claude is the app's own model
    data["breaker"] = {"deployment": {"consecutive_failures": 2}}
    gateway = Gateway(parse_config(data))
    body = {**SMALL_CHAT, "model": "claude-sonnet-4.5"}
    async with gateway.running(), client_for(gateway.wrap(picky_app), KEYS["acme"]) as client:
        for _ in range(4):
            response = await client.post("/v1/chat/completions", json=body)
            _assert_openai_error(response, 400, None)  # type: ignore[arg-type]
            assert response.headers["x-ratelimit-limit-tokens"]
        assert calls == 4
        assert gateway.board.state("app/claude-sonnet-4.5") == CLOSED
        await gateway.writer.flush()  # type: ignore[union-attr]
    records = gateway.ledger.records.values()  # type: ignore[union-attr]
    assert {r.outcome for r in records} == {Outcome.REJECTED_REQUEST}


def test_disconnect_before_any_output_bills_quota_and_ledger_alike() -> None:
    """Quota settles by the billing rules the ledger uses (``tenantware.metering.billing``)."""
    fake = FakeUpstreamConfig(stream_chunks=20, chunk_delay_s=0.4)
    with running_stack(fake) as stack:
        with stack.http() as client:
            body = {**CHAT, "stream": True, "max_tokens": 100}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
        record = stack.record_of(request_id)
        stack.wait_upstream_idle()
        assert record.outcome == Outcome.CLIENT_DISCONNECTED
        assert record.output_tokens == 0
        assert_settled_as_recorded(stack, record)


def test_admission_store_outage_answers_with_the_quota_headers() -> None:
    """Every admission refusal, the store's fail-closed 503 too, passes the quota layer."""
    local = dict.fromkeys(("requests", "tokens", "concurrency", "budget"), "local")
    gateway_settings = {
        "redis_url": f"redis://127.0.0.1:{find_free_port()}/0",  # nobody listens there
        "redis_timeout_s": 0.05,
        "on_store_failure": "closed",
    }
    with running_stack(
        gateway=gateway_settings,
        quota={"on_store_failure": local},
        breaker={"enabled": False},
    ) as stack:
        with stack.http() as client:
            response = client.post("/v1/chat/completions", json=SMALL_CHAT)
        _assert_openai_error(response, 503, "store_unavailable")
        assert response.headers["x-should-retry"] == "true"
        assert response.headers["x-ratelimit-limit-tokens"]
        record = stack.record_of(response.headers["x-request-id"])
        assert record.outcome == Outcome.REJECTED_QUEUE
        assert stack.fake.stats.requests == 0


# -- metrics ---------------------------------------------------------------------------------


def _samples(name: str, tenant: str) -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == name and sample.labels.get("tenant") == tenant
    )


def test_each_rejection_and_queue_wait_is_counted_once_in_the_metrics() -> None:
    """The refusing layer counts its rejection and admission its waits; metering adds none."""
    admission = {"seats": 1}
    fake = FakeUpstreamConfig(latency_s=0.5)
    # A tenant of its own: the metrics registry is process-wide.
    tenant = {**stack_data("")["tenants"][1], "id": "metered"}  # the hobby key
    with running_stack(fake, admission=admission, tenants=[tenant]) as stack:
        rejected_before = _samples("tenantware_rejections_total", "metered")
        waits_before = _samples("tenantware_queue_wait_seconds_count", "metered")
        body = {**SMALL_CHAT, "model": "gemini-2.5-flash"}

        def post(payload: dict[str, Any]) -> httpx.Response:
            with stack.http(KEYS["hobby"]) as client:
                return client.post("/v1/chat/completions", json=payload)

        with ThreadPoolExecutor(2) as pool:
            first, queued = pool.map(post, [body, body], timeout=10)
        too_big = post({**body, "max_tokens": 2_000_000})
        assert (first.status_code, queued.status_code, too_big.status_code) == (200, 200, 429)
        stack.records(3)
        assert _samples("tenantware_rejections_total", "metered") - rejected_before == 1
        assert _samples("tenantware_queue_wait_seconds_count", "metered") - waits_before == 2


def test_client_gone_while_queued_is_recorded_and_charged_nothing() -> None:
    fake = FakeUpstreamConfig(latency_s=1.0)
    with running_stack(fake, admission={"seats": 1}) as stack:
        with ThreadPoolExecutor(1) as pool:

            def hold() -> httpx.Response:
                with stack.http() as client:
                    return client.post("/v1/chat/completions", json=SMALL_CHAT)

            holder = pool.submit(hold)
            deadline = time.monotonic() + 5
            while stack.seats()["*"][0] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with stack.http(KEYS["hobby"]) as client:
                body = {**SMALL_CHAT, "model": "gemini-2.5-flash"}
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/chat/completions", json=body, timeout=0.3)
            assert holder.result(timeout=10).status_code == 200
        records = stack.records(2)
        gone = next(r for r in records if r.tenant == "hobby")
        assert gone.outcome == Outcome.CLIENT_DISCONNECTED
        assert gone.status == 0
        assert gone.cost_nanousd == 0
        assert gone.queue_wait_s > 0
        assert stack.quota("hobby") == {"tokens": 0, "slots": 0}
        assert stack.seats() == {"*": (0, 0)}
        assert stack.fake.stats.requests == 1


def test_a_refused_request_is_recorded_as_rejected_request_not_as_an_error() -> None:
    """An error sent without an outcome is a refusal when it is a 4xx (the proxy's 400s)."""
    with running_stack() as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            stack.sdk().chat.completions.create(model="gpt-4.1", messages=[])
        response = caught.value.response
        _assert_openai_error(response, 400, None)  # type: ignore[arg-type]
        assert response.json()["error"]["param"] == "messages"
        assert response.headers["x-ratelimit-limit-tokens"]
        record = stack.record_of(response.headers["x-request-id"])
        assert record.outcome == Outcome.REJECTED_REQUEST
        assert record.cost_nanousd == 0
        assert stack.fake.stats.requests == 0
        assert stack.quota("acme") == {"tokens": 0, "spend": 0, "slots": 0}


@pytest.mark.anyio
async def test_an_app_answering_4xx_itself_is_recorded_like_a_raised_one() -> None:
    """``final_outcome``: the status decides when no layer named an outcome."""

    async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(send, 422, "This app cannot process that.")  # no ctx, no outcome

    data = stack_data("http://upstream.test")
    data["upstreams"][0]["models"] = ["gpt-4.1"]
    gateway = Gateway(parse_config(data))
    body = {**SMALL_CHAT, "model": "claude-sonnet-4.5"}
    async with gateway.running(), client_for(gateway.wrap(plain_app), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 422
        await gateway.writer.flush()  # type: ignore[union-attr]
    records = list(gateway.ledger.records.values())  # type: ignore[union-attr]
    assert [r.outcome for r in records] == [Outcome.REJECTED_REQUEST]


def test_failed_requests_do_not_teach_admission_a_smaller_output_estimate() -> None:
    """The proxy reports empty usage for an upstream failure; only answers are learned from."""
    breaker = {"max_attempts": 1, "deployment": {"consecutive_failures": 1000}}
    fake = FakeUpstreamConfig(completion_tokens=40)
    with running_stack(fake, breaker=breaker) as stack:
        with stack.http() as client:
            assert client.post("/v1/chat/completions", json=SMALL_CHAT).status_code == 200
            stack.records(1)  # every layer is done with it (admission learns after the answer)
            learned = stack.gateway.admission.output_estimate("acme", 1000)
            assert learned == 20  # the fake stops at max_tokens
            stack.fake.config.fail_next = [500] * 5
            for _ in range(5):
                assert client.post("/v1/chat/completions", json=SMALL_CHAT).status_code == 500
        stack.records(6)
        assert stack.gateway.admission.output_estimate("acme", 1000) == learned
