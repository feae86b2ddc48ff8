"""Upstream usage numbers are untrusted: through the whole stack (tenant, metering, quota,
proxy, the fake upstream reporting what a test tells it), hostile usage is clamped before the
quota layer settles and the ledger stores it, the record is marked, and the anomaly is counted
and logged at a bounded rate. A 200 without usage is billed by the estimator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from tenantware import Gateway
from tenantware.estimate import estimate_text_tokens
from tenantware.metering.ledger import UsageRecord
from tenantware.metrics import REGISTRY
from tenantware.testing.upstream import TOKEN_TEXT, FakeUpstream, FakeUpstreamConfig
from tenantware.types import Receive, Scope, Send
from tests.metering_support import STREAM
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config, tenant_entries

pytestmark = pytest.mark.anyio

MAX_TOKENS = 5
#: The fake answers ``MAX_TOKENS`` tokens of ``TOKEN_TEXT``: what the estimator counts.
RELAYED = estimate_text_tokens(len(TOKEN_TEXT) * MAX_TOKENS)


def _body(stream: bool) -> dict[str, Any]:
    return {**(STREAM if stream else CHAT), "max_tokens": MAX_TOKENS}


def _prompt_estimate(body: dict[str, Any]) -> int:
    # The tenant layer estimates from the body bytes as httpx sends them (json.dumps).
    return estimate_text_tokens(len(json.dumps(body, separators=(",", ":")).encode()))


def _gateway(tmp_path: Path, fake: FakeUpstream, limits: dict[str, Any] | None = None) -> Gateway:
    tenants = tenant_entries()
    overrides: dict[str, Any] = {
        "metering": {"ledger_url": f"sqlite:///{tmp_path}/ledger.db", "request_log": False}
    }
    if limits is not None:
        tenants[0].update(tier="plain", limits=limits)
        overrides.update(tenants=tenants, tiers={"plain": {}})
    gateway, _ = in_process_gateway(fake, make_config(**overrides))
    return gateway


async def _stored(gateway: Gateway) -> dict[str, UsageRecord]:
    assert gateway.writer is not None
    assert gateway.ledger is not None
    await gateway.writer.flush()
    return {r.request_id: r for r in await gateway.ledger.query()}


def _anomalies(kind: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "tenantware_usage_anomalies_total", {"upstream": "fake", "kind": kind}
        )
        or 0.0
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_huge_usage_is_clamped_and_never_blocks_the_ledger_or_locks_the_tenant_out(
    tmp_path: Path, stream: bool
) -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=MAX_TOKENS))
    # A token limit that the clamped usage fits many times and 10**16 tokens never would.
    gateway = _gateway(tmp_path, fake, limits={"tokens_per_minute": 5_000})
    before = _anomalies("too_large")
    body = _body(stream)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        fake.config.usage_override = {"completion_tokens": 10**16, "prompt_tokens": 10**16}
        hostile = await client.post("/v1/chat/completions", json=body)
        fake.config.usage_override = None
        later = [await client.post("/v1/chat/completions", json=body) for _ in range(5)]
        records = await _stored(gateway)
    assert hostile.status_code == 200
    assert [r.status_code for r in later] == [200] * 5  # not locked out
    assert len(records) == 6  # the hostile record did not block the ones after it
    record = records[hostile.headers["x-request-id"]]
    # Replaced by the estimates: the prompt's, and the text that was actually relayed.
    assert (record.input_tokens, record.output_tokens) == (_prompt_estimate(body), RELAYED)
    assert record.usage_invalid
    assert record.estimated
    assert 0 < record.cost_nanousd < 10**9
    for response in later:
        normal = records[response.headers["x-request-id"]]
        assert not normal.usage_invalid
        assert not normal.estimated
        assert normal.output_tokens == MAX_TOKENS
    assert _anomalies("too_large") == before + 1


async def test_negative_usage_is_never_a_credit_and_never_refunds_the_token_limit(
    tmp_path: Path,
) -> None:
    fake = FakeUpstream(
        FakeUpstreamConfig(
            stream_chunks=MAX_TOKENS,
            usage_override={"prompt_tokens": -100_000, "completion_tokens": -100_000},
        )
    )
    body = _body(False)
    per_request = _prompt_estimate(body) + MAX_TOKENS
    admitted = 10
    gateway = _gateway(tmp_path, fake, limits={"tokens_per_minute": per_request * admitted})
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=body)).status_code
            for _ in range(3 * admitted)
        ]
        records = await _stored(gateway)
    # Each request settles to at least its estimate, so the limit admits what it says.
    assert statuses.count(200) <= admitted + 1
    assert 429 in statuses
    for record in records.values():
        assert record.input_tokens >= 0
        assert record.output_tokens >= 0
        assert record.cost_nanousd >= 0
        assert record.charged_nanousd >= 0
        if record.status == 200:
            assert record.usage_invalid


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": "12", "completion_tokens": 1.5},
        {"completion_tokens": True, "prompt_tokens": None, "completion_tokens_details": []},
        {"prompt_tokens_details": {"cached_tokens": 10**30}},
        {"completion_tokens_details": {"reasoning_tokens": -1}},
        {"prompt_tokens": [1, 2], "completion_tokens": {"n": 1}},
    ],
)
async def test_malformed_usage_fields_are_replaced_and_marked(
    tmp_path: Path, usage: dict[str, Any]
) -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=MAX_TOKENS, usage_override=usage))
    gateway = _gateway(tmp_path, fake)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=_body(False))
        records = await _stored(gateway)
    assert response.status_code == 200
    record = records[response.headers["x-request-id"]]
    assert record.usage_invalid
    assert 0 <= record.cached_tokens <= record.input_tokens
    assert 0 <= record.reasoning_tokens <= record.output_tokens <= MAX_TOKENS
    assert record.input_tokens > 0


async def test_output_is_bounded_by_max_tokens_times_n_or_the_configured_ceiling(
    tmp_path: Path,
) -> None:
    fake = FakeUpstream(
        FakeUpstreamConfig(stream_chunks=3, usage_override={"completion_tokens": 50})
    )
    tenants = tenant_entries()
    config = make_config(
        tenants=tenants,
        metering={"ledger_url": "memory://", "request_log": False, "max_output_tokens": 40},
    )
    gateway, _ = in_process_gateway(fake, config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        capped = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10, "n": 6})
        uncapped = await client.post("/v1/chat/completions", json=CHAT)
        small = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
        records = await _stored(gateway)
    # 50 <= 10 x 6: believed. No cap: over the 40 ceiling. 50 > 10: over the request's cap.
    believed = records[capped.headers["x-request-id"]]
    assert (believed.output_tokens, believed.usage_invalid) == (50, False)
    for response in (uncapped, small):
        record = records[response.headers["x-request-id"]]
        assert record.usage_invalid
        assert record.output_tokens == estimate_text_tokens(len(TOKEN_TEXT) * 3)


async def test_an_anomaly_is_logged_once_per_upstream_and_kind_at_a_bounded_rate(
    tmp_path: Path,
) -> None:
    fake = FakeUpstream(
        FakeUpstreamConfig(stream_chunks=MAX_TOKENS, usage_override={"completion_tokens": -1})
    )
    gateway = _gateway(tmp_path, fake)
    before = _anomalies("negative")
    with structlog.testing.capture_logs() as logs:
        async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
            for _ in range(20):
                assert (await client.post("/v1/chat/completions", json=_body(False))).is_success
    lines = [entry for entry in logs if entry["event"].startswith("upstream usage unusable")]
    assert len(lines) == 1
    assert (lines[0]["upstream"], lines[0]["kind"]) == ("fake", "negative")
    assert KEYS["acme"] not in repr(lines)
    assert _anomalies("negative") == before + 20


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_200_without_usage_is_billed_by_the_estimator_and_marked(
    tmp_path: Path, stream: bool
) -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=MAX_TOKENS, omit_usage=True))
    gateway = _gateway(tmp_path, fake, limits={"tokens_per_minute": 100_000})
    body = _body(stream)
    before = _anomalies("missing")
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=body)
        records = await _stored(gateway)
    assert response.status_code == 200
    record = records[response.headers["x-request-id"]]
    assert (record.input_tokens, record.output_tokens) == (_prompt_estimate(body), RELAYED)
    assert record.estimated
    assert not record.usage_invalid
    assert record.cost_nanousd > 0
    assert _anomalies("missing") == before + 1


async def _json_app_without_usage(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    body = json.dumps(
        {"model": "gpt-4.1", "choices": [{"message": {"role": "assistant", "content": "x" * 40}}]}
    ).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def test_an_app_answering_without_usage_is_billed_by_the_estimator() -> None:
    gateway, _ = in_process_gateway()
    async with client_for(gateway.wrap(_json_app_without_usage), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert gateway.writer is not None
    await gateway.writer.flush()
    assert gateway.ledger is not None
    (record,) = await gateway.ledger.query()
    assert response.status_code == 200
    assert (record.input_tokens, record.output_tokens) == (
        _prompt_estimate(CHAT),
        estimate_text_tokens(40),
    )
    assert record.estimated
