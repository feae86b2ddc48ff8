"""Metering: usage from JSON and SSE, the record's fields, the billing rules, logs, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anyio
import openai
import pytest
import structlog

from tenantware import Gateway, KeyHasher, get_context
from tenantware.context import Outcome
from tenantware.errors import GatewayError, send_error
from tenantware.metering.ledger import MemoryLedger
from tenantware.metering.pricing import cost_nanousd
from tenantware.metrics import REGISTRY
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig, count_prompt_tokens
from tenantware.types import Receive, Scope, Send
from tests.metering_support import STREAM, call_streaming, records_of, wait_for
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio

PROMPT = count_prompt_tokens(CHAT)


def _price(gateway: Gateway, model: str = "gpt-4.1") -> Any:
    price = gateway.live.current.catalogue.price(model)
    assert price is not None
    return price


@pytest.fixture
def served_fake() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=8, chunk_delay_s=0.0))
    with serve_in_thread(fake) as url:
        yield fake, url


async def test_json_usage_becomes_one_complete_record() -> None:
    gateway, fake = in_process_gateway()
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 3}, headers={"x-cost-center": "r&d"}
        )
        plain = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-cost-center": "=cmd|' /C calc'!A0"}
        )
        records = await records_of(gateway)
    assert response.status_code == plain.status_code == 200
    first, second = sorted(records, key=lambda r: r.ts)
    assert first.request_id == response.headers["x-request-id"]
    assert (first.tenant, first.key_id, first.cost_center) == ("acme", "acme-1", "r&d")
    # An unusable header falls back to the tenant's default (its id when not configured).
    assert second.cost_center == "acme"
    assert (first.model_requested, first.model_served, first.upstream) == (
        "gpt-4.1",
        "gpt-4.1",
        "fake",
    )
    assert (first.status, first.outcome, first.stream, first.estimated) == (200, "ok", False, False)
    assert (first.input_tokens, first.output_tokens) == (PROMPT, 3)
    assert first.cost_nanousd == cost_nanousd(_price(gateway), PROMPT, 3, 0)
    assert first.charged_nanousd == first.cost_nanousd
    assert first.latency_s > 0
    assert first.upstream_latency_s is not None
    assert first.ttft_s is None
    assert first.record_id != second.record_id
    assert sum(r.output_tokens for r in records) == fake.stats.completion_tokens


async def test_stream_usage_with_and_without_include_usage() -> None:
    gateway, _fake = in_process_gateway(FakeUpstream(FakeUpstreamConfig(stream_chunks=7)))
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        hidden = await client.post("/v1/chat/completions", json=STREAM)
        asked = await client.post(
            "/v1/chat/completions", json={**STREAM, "stream_options": {"include_usage": True}}
        )
        records = {r.request_id: r for r in await records_of(gateway)}
    assert '"usage":{' not in hidden.text.replace(" ", "")
    assert '"usage":{' in asked.text.replace(" ", "")
    for response in (hidden, asked):
        record = records[response.headers["x-request-id"]]
        assert (record.input_tokens, record.output_tokens) == (PROMPT, 7)
        assert record.stream
        assert not record.estimated
        assert record.ttft_s is not None
        assert record.ttft_s <= record.latency_s


def test_sdk_stream_never_sees_the_usage_chunk_and_the_ledger_has_it() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=6))
    ledger = MemoryLedger()
    with serve_in_thread(fake) as upstream_url:
        gateway = Gateway(make_config(upstream_url + "/v1"), ledger=ledger)
        with (
            serve_in_thread(gateway.asgi_app(), lifespan="on") as gateway_url,
            openai.OpenAI(base_url=gateway_url + "/v1", api_key=KEYS["acme"]) as client,
        ):
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4.1", messages=CHAT["messages"], stream=True
                )
            )
            assert chunks
            assert all(chunk.usage is None for chunk in chunks)
            assert all(chunk.choices for chunk in chunks)
            asked = list(
                client.chat.completions.create(
                    model="gpt-4.1",
                    messages=CHAT["messages"],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert asked[-1].usage is not None
            assert asked[-1].usage.completion_tokens == 6
            anyio.run(wait_for, lambda: len(ledger.records) == 2)
    for record in ledger.records.values():
        assert (record.input_tokens, record.output_tokens, record.estimated) == (PROMPT, 6, False)


async def _usage_json_app(scope: Scope, receive: Receive, send: Send) -> None:
    body = (
        b'{"model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":4,'
        b'"prompt_tokens_details":{"cached_tokens":5}}}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body[:20], "more_body": True})
    await send({"type": "http.response.body", "body": body[20:]})


async def _usage_sse_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    events = [
        b'data: {"model":"gpt-4.1","choices":[{"delta":{"content":"tok "}}]}\n\n',
        b'data: {"model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1}}'
        b"\n\n",
        b"data: [DONE]\n\n",
    ]
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(
    ("app", "expected"),
    [(_usage_json_app, (11, 4, 5)), (_usage_sse_app, (9, 1, 0))],
    ids=["json", "sse"],
)
async def test_apps_other_than_the_proxy_are_tapped(app: Any, expected: tuple[int, ...]) -> None:
    gateway = Gateway(make_config())
    async with client_for(gateway.wrap(app), KEYS["acme"]) as client:
        response = await client.post("/v1/anything", json=CHAT)
    assert response.status_code == 200
    (record,) = await records_of(gateway)
    assert (record.input_tokens, record.output_tokens, record.cached_tokens) == expected
    assert record.model_served == "gpt-4.1"
    price = _price(gateway)
    assert record.cost_nanousd == cost_nanousd(price, *expected)


async def test_a_tapped_stream_without_usage_is_estimated_from_what_was_relayed() -> None:
    async def cut_app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        chunk = b'data: {"model":"gpt-4.1","choices":[{"delta":{"content":"tok "}}]}\n\n'
        for _ in range(5):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    gateway = Gateway(make_config())
    async with client_for(gateway.wrap(cut_app), KEYS["acme"]) as client:
        await client.post("/v1/anything", json=CHAT)
    (record,) = await records_of(gateway)
    assert record.estimated
    assert record.output_tokens == 5
    assert record.input_tokens > 0
    assert record.ttft_s is not None


# -- billing rules ------------------------------------------------------------------------


async def test_rule_client_disconnect_bills_what_the_upstream_produced() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=40, chunk_delay_s=0.2))
    with serve_in_thread(fake) as url:
        gateway = Gateway(make_config(url + "/v1"))
        async with gateway.running():
            received = await call_streaming(gateway.asgi_app(), STREAM, disconnect_after=3)
            await wait_for(lambda: fake.stats.in_flight == 0)
            (record,) = await records_of(gateway)
    (produced,) = fake.stats.by_request_id.values()
    assert produced.outcome == "client_disconnected"
    assert 0 < produced.completion_tokens < 40
    assert len(received) >= 3
    assert record.outcome == Outcome.CLIENT_DISCONNECTED
    assert record.estimated
    assert record.output_tokens == produced.completion_tokens
    assert record.cost_nanousd == cost_nanousd(
        _price(gateway), record.input_tokens, record.output_tokens
    )
    assert record.cost_nanousd > 0


async def test_rule_upstream_error_before_any_token_is_not_billed(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    fake, url = served_fake
    fake.config.fail_next = [500, 503]
    # One attempt each: a retry elsewhere would turn the injected error into a success.
    gateway = Gateway(make_config(url + "/v1", breaker={"max_attempts": 1}))
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        json_error = await client.post("/v1/chat/completions", json=CHAT)
        stream_error = await client.post("/v1/chat/completions", json=STREAM)
        fake.config.fail_stream_after = 0
        cut_at_once = await client.post("/v1/chat/completions", json=STREAM)
        records = {r.request_id: r for r in await records_of(gateway)}
    assert (json_error.status_code, stream_error.status_code) == (500, 503)
    for response in (json_error, stream_error, cut_at_once):
        record = records[response.headers["x-request-id"]]
        assert record.outcome == Outcome.UPSTREAM_ERROR
        assert (record.input_tokens, record.output_tokens, record.cost_nanousd) == (0, 0, 0)
    assert fake.stats.completion_tokens == 0


async def test_rule_upstream_error_mid_stream_bills_what_was_relayed(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    fake, url = served_fake
    fake.config.fail_stream_after = 3
    gateway = Gateway(make_config(url + "/v1"))
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=STREAM)
        (record,) = await records_of(gateway)
    relayed = response.text.count('"content":"tok "')
    assert relayed == 3
    assert record.outcome == Outcome.UPSTREAM_ERROR
    assert record.output_tokens == relayed == fake.stats.completion_tokens
    assert record.estimated
    assert record.cost_nanousd == cost_nanousd(_price(gateway), record.input_tokens, relayed)


def _rejecting_layer(outcome: str, status: int, *, raise_it: bool) -> Any:
    """Stands in for an inner policy layer: answers with an OpenAI error and an outcome."""

    class Layer:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if raise_it:
                raise GatewayError(status, "no", type="rate_limit_error", outcome=outcome)
            await send_error(send, status, "no", ctx=get_context(scope), outcome=outcome)

    return Layer


@pytest.mark.parametrize(
    ("outcome", "status", "raise_it"),
    [
        (Outcome.REJECTED_QUOTA, 429, True),
        (Outcome.REJECTED_BUDGET, 429, False),
        (Outcome.REJECTED_QUEUE, 503, False),
        (Outcome.BREAKER_OPEN, 503, True),
    ],
)
async def test_rule_rejections_are_recorded_not_billed(
    outcome: str, status: int, raise_it: bool
) -> None:
    gateway, fake = in_process_gateway()
    app = gateway.wrap(_rejecting_layer(outcome, status, raise_it=raise_it)(gateway.proxy))
    async with client_for(app, KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    (record,) = await records_of(gateway)
    assert response.status_code == status
    assert (record.outcome, record.status, record.tenant) == (outcome, status, "acme")
    assert (record.cost_nanousd, record.input_tokens, record.output_tokens) == (0, 0, 0)
    assert fake.stats.requests == 0


async def test_the_quota_layers_settled_cost_is_what_the_ledger_records() -> None:
    gateway, _ = in_process_gateway()
    seen: list[Any] = []

    def capturing(app: Any) -> Any:
        async def layer(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(get_context(scope))
            await app(scope, receive, send)

        return layer

    async with client_for(gateway.wrap(capturing(gateway.proxy)), KEYS["acme"]) as client:
        await client.post("/v1/chat/completions", json=CHAT)
    (record,) = await records_of(gateway)
    ctx = seen[0]
    # The quota layer (between metering and the app) settled this cost after the app returned.
    assert ctx.cost_nanousd is not None
    assert ctx.cost_nanousd > 0
    assert record.cost_nanousd == ctx.cost_nanousd
    assert record.cost_nanousd == cost_nanousd(
        _price(gateway), ctx.usage.input_tokens, ctx.usage.output_tokens
    )


async def test_fallback_model_is_priced_and_markup_and_discount_apply() -> None:
    config = make_config(
        metering={
            "ledger_url": "memory://",
            "request_log": False,
            "markup_percent": {"acme": "12.5", "hobby": "-20"},
        }
    )
    gateway, _ = in_process_gateway(config=config)

    def falling_back(app: Any) -> Any:
        async def layer(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send)
            get_context(scope).model_served = "claude-sonnet-4.5"

        return layer

    async with client_for(gateway.wrap(falling_back(gateway.proxy)), KEYS["acme"]) as client:
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
        await client.post("/v1/chat/completions", json={**CHAT, "model": "gemini-2.5-flash"})
    acme, hobby = sorted(await records_of(gateway), key=lambda r: r.tenant)
    expected = cost_nanousd(_price(gateway, "claude-sonnet-4.5"), PROMPT, 5)
    assert (acme.model_requested, acme.model_served) == ("gpt-4.1", "claude-sonnet-4.5")
    assert acme.cost_nanousd == expected
    assert acme.charged_nanousd == int(Decimal(expected) * Decimal("1.125"))
    assert hobby.charged_nanousd == hobby.cost_nanousd * 80 // 100


async def test_one_log_line_per_request_without_prompt_or_key() -> None:
    config = make_config(metering={"ledger_url": "memory://"})
    gateway, _ = in_process_gateway(config=config)
    secret_prompt = "my secret prompt text"
    body = {**CHAT, "messages": [{"role": "user", "content": secret_prompt}]}
    with structlog.testing.capture_logs() as logs:
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
            response = await client.post("/v1/chat/completions", json=body)
        await records_of(gateway)
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == response.headers["x-request-id"]
    assert (line["tenant_id"], line["status"], line["outcome"]) == ("acme", 200, "ok")
    assert line["input_tokens"] > 0
    assert line["latency_ms"] > 0
    text = repr(line)
    assert secret_prompt not in text
    assert KEYS["acme"] not in text


async def test_metrics_count_requests_and_need_the_admin_key() -> None:
    admin_key = "sk-admin-test"
    config = make_config(
        metering={
            "ledger_url": "memory://",
            "request_log": False,
            "admin_key_hash": KeyHasher().hash(admin_key),
        }
    )
    gateway, _ = in_process_gateway(config=config)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = sample("tenantware_requests_total", tenant="acme", model="gpt-4.1", outcome="ok")
    tokens_before = sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="output")
    app = gateway.asgi_app()
    async with client_for(app, KEYS["acme"]) as client:
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        await records_of(gateway)
        as_tenant = await client.get("/metrics")
        as_admin = await client.get("/metrics", headers={"authorization": f"Bearer {admin_key}"})
    assert as_tenant.status_code == 401
    assert as_admin.status_code == 200
    assert "tenantware_requests_total" in as_admin.text
    after = sample("tenantware_requests_total", tenant="acme", model="gpt-4.1", outcome="ok")
    assert after == before + 1
    tokens = sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="output")
    assert tokens == tokens_before + 2


def test_metrics_of_one_batch_are_the_sums_of_its_records() -> None:
    """The observer sums counters per label set within a batch: the totals are those of
    counting record by record, and a kind with nothing to count gets no series."""
    from tenantware.metering.ledger.record import UsageRecord
    from tenantware.metering.telemetry import metrics_observer

    gateway, _ = in_process_gateway()
    observe = metrics_observer(gateway.live)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def record(n: int, **fields: Any) -> UsageRecord:
        base: dict[str, Any] = {"record_id": f"m{n}", "request_id": f"q{n}", "ts": 1.0}
        return UsageRecord(**{"tenant": "acme", "model_requested": "gpt-4.1", **base, **fields})

    ok = {"tenant": "acme", "model": "gpt-4.1", "outcome": "ok"}
    before = {
        "requests": sample("tenantware_requests_total", **ok),
        "hobby": sample("tenantware_requests_total", tenant="hobby", model="gpt-4.1", outcome="ok"),
        "input": sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="input"),
        "output": sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="output"),
        "cost": sample("tenantware_cost_nanousd_total", tenant="acme", model="gpt-4.1"),
        "errors": sample("tenantware_rejections_total", tenant="acme", reason="rejected_auth"),
    }
    batch = [
        record(1, outcome="ok", input_tokens=10, output_tokens=3, cost_nanousd=100),
        record(2, outcome="ok", input_tokens=5, output_tokens=0, cost_nanousd=50),
        record(3, tenant="hobby", outcome="ok", input_tokens=7),
        record(4, outcome="rejected_auth", input_tokens=99, cost_nanousd=999),
        record(5, outcome="rejected_auth"),
    ]
    observe(batch)
    assert sample("tenantware_requests_total", **ok) == before["requests"] + 2
    hobby = sample("tenantware_requests_total", tenant="hobby", model="gpt-4.1", outcome="ok")
    assert hobby == before["hobby"] + 1
    acme_input = sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="input")
    assert acme_input == before["input"] + 15  # not the refused record's 99
    acme_output = sample("tenantware_tokens_total", tenant="acme", model="gpt-4.1", kind="output")
    assert acme_output == before["output"] + 3
    cost = sample("tenantware_cost_nanousd_total", tenant="acme", model="gpt-4.1")
    assert cost == before["cost"] + 150
    errors = sample("tenantware_rejections_total", tenant="acme", reason="rejected_auth")
    assert errors == before["errors"] + 2
    seconds = sample("tenantware_request_seconds_count", tenant="acme", model="gpt-4.1")
    assert seconds >= 4  # every acme record observed (histograms stay per record)
    # Nothing was cached for hobby: no zero-valued series appears.
    cached = REGISTRY.get_sample_value(
        "tenantware_tokens_total", {"tenant": "hobby", "model": "gpt-4.1", "kind": "cached"}
    )
    assert cached is None


def test_metering_settings_are_validated() -> None:
    from tenantware import ConfigError, parse_config

    ok = parse_config(
        {"metering": {"markup_percent": {"acme": 12.5}, "currency": "EUR", "currency_per_usd": 0.9}}
    )
    assert ok.metering.markup_percent == {"acme": Decimal("12.5")}
    assert ok.metering.currency_per_usd == Decimal("0.9")
    for bad in (
        {"markup_percent": {"acme": "-150"}},
        {"currency": "euro"},
        {"currency_per_usd": "-1"},
        {"flush_interval_s": 0},
        {"admin_key_hash": "plain-text-key"},
    ):
        with pytest.raises(ConfigError):
            parse_config({"metering": bad})


async def test_metering_can_be_disabled() -> None:
    config = make_config(metering={"enabled": False})
    gateway, _ = in_process_gateway(config=config)
    assert gateway.writer is None
    assert "MeteringMiddleware" not in [m.cls.__name__ for m in gateway.middleware()]
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await client.get("/v1/usage")).status_code == 404
        metrics = await client.get("/metrics")  # other layers' metrics are still served
        assert metrics.status_code == 401  # (behind the admin key, none configured here)


async def test_tenant_layer_refusals_are_recorded_once_and_not_billed() -> None:
    gateway, fake = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
        not_allowed = await client.post("/v1/chat/completions", json=CHAT)  # gpt-4.1: 403
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        malformed = await client.post(
            "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
        )
        # Refused by the proxy (inside metering): recorded by metering, not a second time.
        no_messages = await client.post("/v1/chat/completions", json={"model": "gemini-2.5-flash"})
    async with client_for(gateway.asgi_app(), "sk-unknown") as client:
        unauthenticated = await client.post("/v1/chat/completions", json=CHAT)
    statuses = [r.status_code for r in (not_allowed, unknown, malformed, no_messages)]
    assert statuses == [403, 404, 400, 400]
    assert unauthenticated.status_code == 401
    records = {r.request_id: r for r in await records_of(gateway)}
    assert len(records) == 4  # no tenant behind the 401: nothing to bill or record
    for response in (not_allowed, unknown, malformed, no_messages):
        record = records[response.headers["x-request-id"]]
        assert (record.tenant, record.status) == ("hobby", response.status_code)
        assert record.outcome == Outcome.REJECTED_REQUEST
        assert (record.cost_nanousd, record.input_tokens, record.output_tokens) == (0, 0, 0)
    assert fake.stats.requests == 0
