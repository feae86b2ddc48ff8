"""Metering's cost per request (JSON and a 200-chunk stream) and ledger write throughput.

Run: ``pytest benchmarks/test_bench_metering.py -p no:cacheprovider --benchmark-enable``.
Each round calls the stack 500 times inside one event-loop run; the figure per request is the
round's time / 500. Metering's added cost is (tenant + metering) minus (tenant alone), over an
inner app that answers like the proxy (sets ``ctx.upstream`` and ``ctx.usage``) or like a
plain app (metering then taps the response itself).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tenantware import KeyHasher, LiveConfig, TenantMiddleware, get_context, parse_config
from tenantware.context import Outcome, Usage
from tenantware.metering.ledger import LedgerWriter, MemoryLedger, SqliteLedger, UsageRecord
from tenantware.metering.ledger.base import Ledger
from tenantware.middleware.metering import MeteringMiddleware
from tenantware.types import Message, Receive, Scope, Send

CALLS = 500
KEY = "sk-bench"
BODY = json.dumps(
    {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello there"}]}
).encode()
JSON_ANSWER = (
    b'{"id":"x","model":"gpt-4.1","choices":[{"message":{"content":"hi"}}],'
    b'"usage":{"prompt_tokens":6,"completion_tokens":2}}'
)
CHUNK = b'data: {"model":"gpt-4.1","choices":[{"delta":{"content":"tok "}}]}\n\n'
USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":6,"completion_tokens":200}}\n\n'
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


def _live() -> LiveConfig:
    return LiveConfig(
        parse_config(
            {
                "tenants": [{"id": "acme", "keys": [{"id": "k", "hash": KeyHasher().hash(KEY)}]}],
                "metering": {"ledger_url": "memory://", "request_log": False},
            }
        )
    )


def _inner(stream: bool, proxy_like: bool) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        if proxy_like:
            ctx.upstream = "fake"
            ctx.model_served = "gpt-4.1"
        if not stream:
            if proxy_like:  # the proxy sets a JSON answer's usage before relaying it
                ctx.usage = Usage(input_tokens=6, output_tokens=2)
                ctx.outcome = Outcome.OK
            await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
            await send({"type": "http.response.body", "body": JSON_ANSWER})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for _ in range(200):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": USAGE_CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        if proxy_like and stream:  # and a stream's once the stream has ended
            ctx.usage = Usage(input_tokens=6, output_tokens=200)
            ctx.outcome = Outcome.OK

    return app


def _stack(stream: bool, *, metered: bool, proxy_like: bool = True) -> tuple[Any, LedgerWriter]:
    live = _live()
    writer = LedgerWriter(MemoryLedger())
    app = _inner(stream, proxy_like)
    if metered:
        app = MeteringMiddleware(app, live=live, writer=writer)
    return TenantMiddleware(app, live=live), writer


def _runner(app: Any, writer: LedgerWriter, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
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
        writer._fresh.clear()  # the writer is not running: keep memory flat

    def run() -> None:
        loop.run_until_complete(many())

    return run


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream200"])
@pytest.mark.parametrize(
    "variant", ["tenant-only", "tenant+metering", "tenant+metering-tap"], ids=str
)
def test_bench_metering_per_request(benchmark: Any, stream: bool, variant: str) -> None:
    app, writer = _stack(
        stream, metered=variant != "tenant-only", proxy_like=variant != "tenant+metering-tap"
    )
    benchmark.extra_info["calls_per_round"] = CALLS
    loop = asyncio.new_event_loop()
    try:
        benchmark.pedantic(_runner(app, writer, loop), rounds=8, warmup_rounds=1)
    finally:
        loop.close()


def _records(n: int, tag: str) -> list[UsageRecord]:
    return [
        UsageRecord(
            record_id=f"{tag}-{i}",
            request_id=f"req-{i}",
            ts=1e9 + i,
            tenant=f"t{i % 8}",
            model_requested="gpt-4.1",
            model_served="gpt-4.1",
            upstream="fake",
            status=200,
            outcome="ok",
            input_tokens=100,
            output_tokens=20,
            cost_nanousd=360_000,
            charged_nanousd=360_000,
            latency_s=0.2,
        )
        for i in range(n)
    ]


def _throughput(ledger: Ledger, n: int = 20_000, batch: int = 1000) -> float:
    async def run() -> float:
        await ledger.open()
        records = _records(n, str(time.time_ns()))
        started = time.perf_counter()
        for start in range(0, n, batch):
            await ledger.write(records[start : start + batch])
        elapsed = time.perf_counter() - started
        await ledger.aclose()
        return n / elapsed

    return asyncio.run(run())


def test_bench_ledger_throughput_sqlite(benchmark: Any, tmp_path: Any) -> None:
    rate = benchmark.pedantic(
        lambda: _throughput(SqliteLedger(tmp_path / f"{time.time_ns()}.db")), rounds=3
    )
    benchmark.extra_info["records_per_s"] = round(rate)
    print(f"\nSQLite ledger: {rate:,.0f} records/s")


def test_bench_ledger_throughput_postgres(
    benchmark: Any, postgres_url: str, postgres_schema: str
) -> None:
    from tenantware.metering.ledger.postgres import PostgresLedger

    rate = benchmark.pedantic(
        lambda: _throughput(PostgresLedger(postgres_url, schema=postgres_schema)), rounds=3
    )
    benchmark.extra_info["records_per_s"] = round(rate)
    print(f"\nPostgreSQL ledger: {rate:,.0f} records/s")


def test_bench_request_log_lines(benchmark: Any) -> None:
    """The request log observer as ``tenantware serve`` runs it (JSON lines in one write per
    batch): one round renders 50 batches of 64 records, so µs per record = ms per round x
    1000 / 3200. Run with ``--benchmark-timer=time.process_time``."""
    import structlog

    from tenantware.logs import configure_json_logging
    from tenantware.metering.telemetry import log_records

    records = _records(64, "log")
    with open("/dev/null", "wb") as sink:
        configure_json_logging(sink)
        try:
            benchmark.pedantic(
                lambda: [log_records(records) for _ in range(50)], rounds=30, warmup_rounds=2
            )
        finally:
            structlog.reset_defaults()
