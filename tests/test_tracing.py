"""OpenTelemetry tracing: spans captured with the SDK's in-memory exporter, parent links and
attributes checked, retries visible as sibling attempts, ``traceparent`` reaching the fake
upstream; a real OTLP/HTTP export to a collector on a loopback port; off by default."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tenantware import Gateway, HttpxUpstreamClient, parse_config
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream
from tenantware.types import Receive, Scope, Send
from tests.support import CHAT, KEYS, client_for, make_config, tenant_entries

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


class Hosts:
    """One in-process ASGI app per upstream host name."""

    def __init__(self, **apps: FakeUpstream) -> None:
        self.apps = {f"{name}.test": app for name, app in apps.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope["headers"])[b"host"].decode()
        await self.apps[host](scope, receive, send)


def traced_gateway(
    provider: TracerProvider, hosts: Hosts, upstreams: list[dict[str, Any]], **extra: Any
) -> Gateway:
    data = {
        "tenants": extra.pop("tenants", tenant_entries()),
        "upstreams": upstreams,
        "metering": {"ledger_url": "memory://", "request_log": False},
        **extra,
    }
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=hosts))
    return Gateway(parse_config(data), upstream_client=client, tracer_provider=provider)


def upstream(name: str, *models: str) -> dict[str, Any]:
    return {"name": name, "base_url": f"http://{name}.test/v1", "models": list(models)}


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


@pytest.mark.parametrize("stream", [False, True])
async def test_one_server_span_per_request_continues_the_callers_trace_to_the_upstream(
    provider: TracerProvider, exporter: InMemorySpanExporter, stream: bool
) -> None:
    fake = FakeUpstream()
    gateway = traced_gateway(provider, Hosts(main=fake), [upstream("main", "gpt-4.1")])
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": stream},
            headers={"traceparent": TRACEPARENT, "x-request-id": "req-traced-1"},
        )
    assert response.status_code == 200

    spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    [attempt] = by_kind(spans, SpanKind.CLIENT)
    # The server span continues the caller's trace; the attempt is its child.
    assert server.context is not None
    assert attempt.context is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert attempt.parent is not None
    assert attempt.parent.span_id == server.context.span_id
    assert attempt.context.trace_id == server.context.trace_id
    # The upstream received the attempt span as its parent.
    record = fake.stats.by_request_id["req-traced-1"]
    assert record.traceparent == traceparent_of(attempt)

    assert server.name == "POST /v1/chat/completions"
    attributes = dict(server.attributes or {})
    usage_tokens = (record.prompt_tokens, record.completion_tokens)
    assert attributes["tenantware.tenant"] == "acme"
    assert attributes["tenantware.key_id"] == "acme-1"
    assert attributes["tenantware.model"] == "gpt-4.1"
    assert attributes["tenantware.model_served"] == "gpt-4.1"
    assert attributes["tenantware.upstream"] == "main"
    assert attributes["tenantware.outcome"] == "ok"
    assert attributes["tenantware.stream"] is stream
    assert attributes["http.response.status_code"] == 200
    assert attributes["tenantware.request_id"] == "req-traced-1"
    assert (
        attributes["tenantware.usage.input_tokens"],
        attributes["tenantware.usage.output_tokens"],
    ) == usage_tokens
    assert isinstance(attributes["tenantware.cost_nanousd"], int)
    assert attributes["tenantware.cost_nanousd"] > 0
    assert attributes["tenantware.queue_wait_s"] >= 0
    assert attributes["tenantware.quota.decision"] == "allowed"
    assert attributes["tenantware.quota.source"] == "store"
    assert server.status.status_code == StatusCode.UNSET

    attempt_attributes = dict(attempt.attributes or {})
    assert attempt_attributes["tenantware.attempt"] == 1
    assert attempt_attributes["tenantware.deployment"] == "main/gpt-4.1"
    assert attempt_attributes["http.response.status_code"] == 200

    # No prompt text and no key anywhere in a span.
    for span in spans:
        for value in (span.attributes or {}).values():
            assert "Hello there" not in str(value)
            assert KEYS["acme"] not in str(value)


async def test_a_retry_on_the_fallback_model_is_a_sibling_attempt_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    primary, backup = FakeUpstream(), FakeUpstream()
    gateway = traced_gateway(
        provider,
        Hosts(primary=primary, backup=backup),
        [upstream("primary", "gpt-4.1"), upstream("backup", "gemini-2.5-flash")],
        breaker={"max_attempts": 2, "fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]}},
    )
    primary.config.fail_next = [500]
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-retried"}
        )
    assert response.status_code == 200

    spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    attempts = sorted(by_kind(spans, SpanKind.CLIENT), key=lambda span: span.start_time or 0)
    assert len(attempts) == 2
    assert server.context is not None
    # Siblings: both children of the server span, in a trace the gateway started.
    assert server.parent is None
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == server.context.span_id
    failed, answered = (dict(span.attributes or {}) for span in attempts)
    assert failed["tenantware.attempt"] == 1
    assert failed["tenantware.upstream"] == "primary"
    assert failed["http.response.status_code"] == 500
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert answered["tenantware.attempt"] == 2
    assert answered["tenantware.upstream"] == "backup"
    assert answered["tenantware.model_served"] == "gemini-2.5-flash"
    assert attempts[1].status.status_code == StatusCode.UNSET
    # Each upstream saw its own attempt as the parent.
    assert primary.stats.by_request_id["req-retried"].traceparent == traceparent_of(attempts[0])
    assert backup.stats.by_request_id["req-retried"].traceparent == traceparent_of(attempts[1])

    attributes = dict(server.attributes or {})
    assert attributes["tenantware.model"] == "gpt-4.1"
    assert attributes["tenantware.model_served"] == "gemini-2.5-flash"
    assert attributes["tenantware.upstream"] == "backup"


async def test_a_quota_refusal_names_the_limit_and_reaches_no_upstream(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    fake = FakeUpstream()
    tenants = tenant_entries()
    tenants[0].update(tier="plain", limits={"requests_per_minute": 2})
    gateway = traced_gateway(
        provider,
        Hosts(main=fake),
        [upstream("main", "gpt-4.1")],
        tenants=tenants,
        tiers={"plain": {}},
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)
        ]
    assert statuses == [200, 200, 429]

    servers = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert len(servers) == 3
    refused = dict(servers[2].attributes or {})
    assert refused["tenantware.quota.decision"] == "refused"
    assert refused["tenantware.quota.source"] == "store"
    assert "requests" in refused["tenantware.quota.limit"]
    assert refused["tenantware.outcome"] == "rejected_quota"
    assert refused["http.response.status_code"] == 429
    assert "tenantware.upstream" not in refused
    assert len(by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)) == 2


async def test_an_unreachable_upstream_marks_both_spans_as_errors(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    config = make_config("http://127.0.0.1:9/v1", breaker={"max_attempts": 1})
    gateway = Gateway(config, tracer_provider=provider)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await gateway.aclose()
    assert response.status_code == 502
    spans = exporter.get_finished_spans()
    [server] = by_kind(spans, SpanKind.SERVER)
    [attempt] = by_kind(spans, SpanKind.CLIENT)
    assert attempt.status.status_code == StatusCode.ERROR
    assert dict(attempt.attributes or {})["error.type"] == "UpstreamConnectError"
    assert server.status.status_code == StatusCode.ERROR
    assert dict(server.attributes or {})["tenantware.outcome"] == "upstream_error"


def test_tracing_is_off_by_default_and_imports_no_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import sys
        from tenantware import Gateway
        from tests.support import make_config
        gateway = Gateway(make_config())
        assert gateway.tracing is None
        assert gateway.proxy.dispatcher.tracing is None
        names = [layer.cls.__name__ for layer in gateway.middleware()]
        assert "TracingMiddleware" not in names, names
        loaded = [name for name in sys.modules if name.startswith("opentelemetry")]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


class Collector:
    """A minimal OTLP/HTTP traces endpoint: keeps every export request it receives."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.requests.append(request)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": b""})


async def test_enabled_by_configuration_spans_reach_an_otlp_collector() -> None:
    collector = Collector()
    with serve_in_thread(collector) as collector_url:
        config = make_config(
            tracing={
                "enabled": True,
                "endpoint": f"{collector_url}/v1/traces",
                "service_name": "gateway-under-test",
            }
        )
        fake = FakeUpstream()
        client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
        gateway = Gateway(config, upstream_client=client)
        assert gateway.tracing is not None
        async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as http:
            response = await http.post(
                "/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
            )
            assert response.status_code == 200
        # Leaving ``running()`` shut the provider down: the batch was flushed.
        with anyio.fail_after(30):
            while not collector.requests:
                await anyio.sleep(0.05)
    spans = [
        (resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope_spans in resource.scope_spans
        for span in scope_spans.spans
    ]
    names = sorted(span.name for _, span in spans)
    assert names == ["POST /v1/chat/completions", "upstream attempt"]
    for resource, span in spans:
        assert span.trace_id.hex() == TRACE_ID
        service = {a.key: a.value.string_value for a in resource.resource.attributes}
        assert service["service.name"] == "gateway-under-test"
