"""In-process cost of each middleware, of the whole stack and of the proxy's relay.

Run: ``pytest benchmarks/test_bench_stack.py --benchmark-enable --benchmark-time-unit=ms``.
Each round drives ``BATCH`` (1000) requests through the ASGI callable inside one event loop,
so the figures pytest-benchmark prints in *milliseconds per round* read as *microseconds per
request*. The layers are taken from ``Gateway.middleware()``: ``stack[:k]`` measures the
stack through layer k, so each layer's own cost is the step from the previous row.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
from benchconfig import BENCH_KEY, CHAT_BODY, STREAM_BODY, bench_config, configure_logging

from tenantware import Gateway, parse_config
from tenantware.middleware.tenant import TenantMiddleware
from tenantware.state import LiveConfig
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

try:
    import uvloop

    _new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # pragma: no cover
    _new_loop = asyncio.new_event_loop

#: Requests per benchmark round: milliseconds per round == microseconds per request.
BATCH = 1000
UPSTREAM_URL = "http://upstream.bench/v1"


def _scope(path: str = "/v1/chat/completions", body: bytes = CHAT_BODY) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"user-agent", b"OpenAI/Python 1.55.0"),
            (b"accept", b"application/json"),
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer " + BENCH_KEY.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }


def _receiver(body: bytes, done: asyncio.Event | None = None) -> Receive:
    """The body once, then, as a real server does, block until ``done`` (the response is
    complete; never, when None) and answer ``http.disconnect``."""
    sent = False
    disconnect = done or asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await disconnect.wait()
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def call_app(
    app: ASGIApp, scope: Scope, body: bytes, on_status: Callable[[int], None] | None = None
) -> None:
    """One request through ``app`` as uvicorn makes it: the body once, then ``receive()``
    blocks until the response is complete (or the client leaves) and answers
    ``http.disconnect``. ``on_status`` sees the response's status."""
    complete = asyncio.Event()

    async def send(event: Message) -> None:
        if event["type"] == "http.response.body" and not event.get("more_body", False):
            complete.set()
        elif event["type"] == "http.response.start" and on_status is not None:
            on_status(event["status"])

    await app(dict(scope), _receiver(body, complete), send)


async def noop_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The cheapest real app: reads its body and answers a fixed JSON."""
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


class _RecordingClient:
    """Stands in for the network: asks the fake upstream once per distinct request, then
    replays its exact status, headers and body chunks, so only the proxy's work is timed."""

    def __init__(self) -> None:
        self.fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=20, record_requests=False))
        self._cache: dict[tuple[str, bytes], tuple[int, list[tuple[bytes, bytes]], list[bytes]]]
        self._cache = {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Any,
    ) -> _Canned:
        key = (url, body)
        if key not in self._cache:
            self._cache[key] = await self._record(url, body)
        status, relayed, chunks = self._cache[key]
        return _Canned(status, relayed, chunks)

    async def _record(
        self, url: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
        path = "/" + url.split("/", 3)[3]
        scope = _scope(path, body)
        sent: list[Message] = []

        async def capture(message: Message) -> None:
            sent.append(message)

        await self.fake(scope, _receiver(body), capture)
        start = sent[0]
        relayed = [(n, v) for n, v in start["headers"] if n == b"content-type"]
        chunks = [m["body"] for m in sent[1:] if m.get("body")]
        return start["status"], relayed, chunks

    async def aclose(self) -> None:
        return None


class _Canned:
    __slots__ = ("_chunks", "_iterator", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
        self.status = status
        self.headers = headers
        self._chunks = chunks
        self._iterator: AsyncIterator[bytes] | None = None

    def header(self, name: str) -> str | None:
        return None

    async def read(self, max_bytes: int) -> bytes:
        return b"".join(self._chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def read_chunk(self) -> bytes:
        # One async generator step per chunk and a shielded ``aclose`` below: what the relay
        # paid for this response before both became part of the protocol (like for like).
        if self._iterator is None:
            self._iterator = self.chunks()
        async for chunk in self._iterator:
            return chunk
        return b""

    ended = False

    def close_now(self) -> Awaitable[None]:
        return self.aclose()

    async def aclose(self) -> None:
        return None


#: The SQLite ledger of the metering layer lives here for the session.
_WORKDIR = tempfile.TemporaryDirectory(prefix="twbench-stack-")


def _gateway(client: Any = None) -> Gateway:
    config = bench_config(UPSTREAM_URL, workdir=_WORKDIR.name)
    return Gateway(parse_config(config), upstream_client=client)


def _layer_names() -> list[str]:
    return [layer.cls.__name__ for layer in _gateway().middleware()]  # type: ignore[attr-defined]


LAYERS = _layer_names()


@pytest.fixture
def drive() -> Iterator[Callable[[Gateway, ASGIApp, bytes], Callable[[], None]]]:
    """``drive(gateway, app, body)`` -> a callable running BATCH requests on one loop.

    The gateway's lifetime services (``gateway.running()``) stay entered in a task of that
    loop for the whole benchmark, as under a server's lifespan.
    """
    # The request log as a deployment renders it (JSON lines), not structlog's console default.
    configure_logging()
    loop = _new_loop()
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def make(
        gateway: Gateway,
        app: ASGIApp,
        body: bytes,
        path: str = "/v1/chat/completions",
        settled: Callable[[], bool] | None = None,
        latencies: list[float] | None = None,
    ) -> Callable[[], None]:
        ready, stop = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with gateway.running():
                ready.set()
                await stop.wait()

        holder = loop.create_task(hold())
        loop.run_until_complete(ready.wait())
        stops.append((stop, holder))
        scope = _scope(path, body)

        async def one_request() -> None:
            await call_app(app, scope, body)

        async def batch() -> None:
            for _ in range(BATCH):
                if latencies is None:
                    await one_request()
                else:
                    started = time.perf_counter()
                    await one_request()
                    latencies.append(time.perf_counter() - started)
            if settled is not None:
                # Work the batch started in the background (shadow calls) is part of it.
                while not settled():
                    await asyncio.sleep(0)

        def run() -> None:
            loop.run_until_complete(batch())

        run()  # warm: caches, recorded upstream answers
        return run

    yield make
    for stop, holder in stops:
        stop.set()
        loop.run_until_complete(holder)
    loop.close()
    structlog.reset_defaults()


def _bench(benchmark: Any, run: Callable[[], None]) -> None:
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("depth", range(1, len(LAYERS) + 1), ids=LAYERS)
def test_stack_through_layer(benchmark: Any, drive: Any, depth: int) -> None:
    """Stack outermost..layer ``depth`` around the no-op app (memory backends)."""
    gateway = _gateway()
    app: ASGIApp = noop_app
    for layer in reversed(gateway.middleware()[:depth]):
        app = layer.cls(app, *layer.args, **layer.kwargs)
    _bench(benchmark, drive(gateway, app, CHAT_BODY))


def test_tenant_middleware_alone(benchmark: Any, drive: Any) -> None:
    gateway = _gateway()
    app = TenantMiddleware(noop_app, live=LiveConfig(gateway.config))
    _bench(benchmark, drive(gateway, app, CHAT_BODY))


def test_whole_stack_noop_app(benchmark: Any, drive: Any) -> None:
    """``Gateway.wrap(noop_app)``: the target is under 50 µs per request."""
    gateway = _gateway()
    _bench(benchmark, drive(gateway, gateway.wrap(noop_app), CHAT_BODY))


def test_noop_app_alone(benchmark: Any, drive: Any) -> None:
    """The harness itself (scope copy, receive, send): subtract it from the rows above."""
    _bench(benchmark, drive(_gateway(), noop_app, CHAT_BODY))


@pytest.mark.parametrize("body", [CHAT_BODY, STREAM_BODY], ids=["json", "stream20"])
def test_whole_stack_proxy(benchmark: Any, drive: Any, body: bytes) -> None:
    """Stack + proxy relaying a recorded upstream answer (JSON, or 20 SSE events + usage)."""
    gateway = _gateway(_RecordingClient())
    _bench(benchmark, drive(gateway, gateway.wrap(gateway.proxy), body))


def test_proxy_through_inprocess_fake(benchmark: Any, drive: Any) -> None:
    """Stack + proxy + httpx ASGITransport + the fake upstream itself, all in process."""
    import httpx

    from tenantware import HttpxUpstreamClient

    fake = FakeUpstream(FakeUpstreamConfig(record_requests=False))
    gateway = _gateway(HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake)))
    _bench(benchmark, drive(gateway, gateway.wrap(gateway.proxy), CHAT_BODY))


#: Anthropic's Messages API: the same prompt as ``CHAT_BODY``.
MESSAGES_BODY = (
    b'{"model":"claude-sonnet-4.5","system":"You are terse.","messages":[{"role":"user",'
    b'"content":"Say hello to the benchmark, please."}],"max_tokens":64}'
)


#: OpenAI's Responses API: the same prompt again.
RESPONSES_BODY = (
    b'{"model":"gpt-4.1","instructions":"You are terse.",'
    b'"input":"Say hello to the benchmark, please.","max_output_tokens":64}'
)


def _two_format_gateway(client: Any) -> Gateway:
    """claude-sonnet-4.5 on an Anthropic-native upstream, every other model on OpenAI's."""
    config = bench_config(UPSTREAM_URL, workdir=_WORKDIR.name)
    openai_upstream = config["upstreams"][0]
    openai_upstream["models"] = [m for m in openai_upstream["models"] if m != "claude-sonnet-4.5"]
    config["upstreams"].append(
        {
            "name": "fake-anthropic",
            "api": "anthropic",
            "base_url": UPSTREAM_URL,
            "models": ["claude-sonnet-4.5"],
            "timeout_s": 30,
        }
    )
    return Gateway(parse_config(config), upstream_client=client)


def _gpt(body: bytes) -> bytes:
    return body.replace(b'"claude-sonnet-4.5"', b'"gpt-4.1"')


def _stream(body: bytes) -> bytes:
    return body[:-1] + b',"stream":true}'


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", MESSAGES_BODY),
        ("/v1/messages", _stream(MESSAGES_BODY)),
        ("/v1/messages", _gpt(MESSAGES_BODY)),
        ("/v1/messages", _stream(_gpt(MESSAGES_BODY))),
        ("/v1/chat/completions", CHAT_BODY.replace(b'"gpt-4.1"', b'"claude-sonnet-4.5"')),
        ("/v1/chat/completions", STREAM_BODY.replace(b'"gpt-4.1"', b'"claude-sonnet-4.5"')),
        ("/v1/responses", RESPONSES_BODY),
        ("/v1/responses", _stream(RESPONSES_BODY)),
    ],
    ids=[
        "messages-native-json",
        "messages-native-stream20",
        "messages-to-openai-json",
        "messages-to-openai-stream20",
        "chat-to-anthropic-json",
        "chat-to-anthropic-stream20",
        "responses-to-chat-json",
        "responses-to-chat-stream20",
    ],
)
def test_whole_stack_formats(benchmark: Any, drive: Any, path: str, body: bytes) -> None:
    """Stack + proxy on Anthropic's route, relayed natively or translated, and an OpenAI
    request translated for an Anthropic upstream: compare with ``test_whole_stack_proxy``."""
    client = _RecordingClient()
    gateway = _two_format_gateway(client)
    run = drive(gateway, gateway.wrap(gateway.proxy), body, path)
    # The warm-up round reached the fake upstream: it accepted the (translated) request.
    assert [status for status, _, _ in client._cache.values()] == [200]
    _bench(benchmark, run)


@pytest.mark.parametrize("shadow", [0, 100], ids=["shadow-off", "shadow-100"])
@pytest.mark.parametrize("body", [CHAT_BODY, STREAM_BODY], ids=["json", "stream20"])
def test_whole_stack_proxy_shadow(benchmark: Any, drive: Any, body: bytes, shadow: int) -> None:
    """Issue 19: the stack + proxy with a shadow copy of every request to a candidate (the
    same recorded upstream under another name), against no rule at all. Each round waits for
    its shadow calls, so their CPU is counted; the primary's own latency per request (its
    answer complete, shadows still running) is in ``extra_info`` (p50/p99, µs)."""
    config = bench_config(UPSTREAM_URL, workdir=_WORKDIR.name)
    if shadow:
        fake = config["upstreams"][0]
        config["upstreams"].append({**fake, "name": "candidate", "models": []})
        candidate = {"upstream": "candidate", "shadow_percent": shadow}
        config["migration"] = {
            "shadow_concurrency": 1024,
            "rules": [{"name": "bench", "model": "gpt-4.1", "candidates": [candidate]}],
        }
    gateway = Gateway(parse_config(config), upstream_client=_RecordingClient())
    latencies: list[float] = []
    run = drive(
        gateway,
        gateway.wrap(gateway.proxy),
        body,
        settled=lambda: gateway.migration.in_flight == 0,
        latencies=latencies,
    )
    latencies.clear()
    _bench(benchmark, run)
    ordered = sorted(latencies)
    benchmark.extra_info["primary_p50_us"] = ordered[len(ordered) // 2] * 1e6
    benchmark.extra_info["primary_p99_us"] = ordered[int(len(ordered) * 0.99)] * 1e6
    benchmark.extra_info["shadow_dropped"] = sum(gateway.migration.book.dropped.values())


@pytest.mark.parametrize("report", ["process", "shared"])
@pytest.mark.parametrize("kind", ["canary", "shadow"])
def test_whole_stack_proxy_migration_report(
    benchmark: Any, drive: Any, kind: str, report: str, redis_url: str, redis_prefix: str
) -> None:
    """Every JSON request canaried (the comparison counted on the request's path) or
    shadowed (counted in the shadow's task), its comparison kept in this process's book
    (``process``) or folded into counters sent to Redis once a second (``shared``, with the
    flush task running: its CPU falls inside the rounds)."""
    config = bench_config(UPSTREAM_URL, workdir=_WORKDIR.name)
    fake = config["upstreams"][0]
    config["upstreams"].append({**fake, "name": "candidate", "models": []})
    candidate = {"upstream": "candidate", f"{kind}_percent": 100}
    config["migration"] = {
        "shadow_concurrency": 1024,
        "rules": [{"name": "bench", "model": "gpt-4.1", "candidates": [candidate]}],
    }
    gateway = Gateway(parse_config(config), upstream_client=_RecordingClient())
    if report == "shared":
        from tenantware.backends.redis_support import connect_redis
        from tenantware.migration.redis import RedisReportStore

        redis = connect_redis(redis_url, timeout_s=1.0, client_name="tw-bench-report")
        gateway.migration.shared = RedisReportStore(redis, prefix=redis_prefix)

        @asynccontextmanager
        async def closing() -> AsyncIterator[None]:
            try:
                yield
            finally:  # after the runner's last flush, before the harness closes its loop
                await redis.aclose()

        gateway._services.insert(0, closing)  # entered first, left last (as the stores)
    run = drive(
        gateway,
        gateway.wrap(gateway.proxy),
        CHAT_BODY,
        settled=lambda: gateway.migration.in_flight == 0,
    )
    _bench(benchmark, run)
    if report == "shared":
        benchmark.extra_info["counters_waiting"] = bool(gateway.migration.tally)


def _traced_gateway(client: Any, mode: str) -> Gateway:
    """The benchmark gateway with tracing ``off`` (the default), ``on`` (every request
    recorded, batched to an exporter that drops them: the export itself runs on the SDK's
    thread, off the request path) or ``unsampled`` (on, ``sample_ratio`` 0)."""
    if mode == "off":
        return _gateway(client)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if mode == "on" else ALWAYS_OFF)
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    config = bench_config(UPSTREAM_URL, workdir=_WORKDIR.name)
    return Gateway(parse_config(config), upstream_client=client, tracer_provider=provider)


@pytest.mark.parametrize("mode", ["off", "on", "unsampled"])
@pytest.mark.parametrize("body", [CHAT_BODY, STREAM_BODY], ids=["json", "stream20"])
def test_whole_stack_proxy_tracing(benchmark: Any, drive: Any, body: bytes, mode: str) -> None:
    """``test_whole_stack_proxy`` with tracing off, on, and on but not sampled."""
    gateway = _traced_gateway(_RecordingClient(), mode)
    _bench(benchmark, drive(gateway, gateway.wrap(gateway.proxy), body))
