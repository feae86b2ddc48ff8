"""Load proofs: ledger totals equal the upstream's own counts; SIGTERM loses nothing; SIGKILL
loses at most what completed in the last flush interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient, KeyHasher, parse_config
from tenantware.metering.ledger import MemoryLedger, SqliteLedger
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tenantware.types import Message
from tests.servers import find_free_port
from tests.support import CHAT

pytestmark = pytest.mark.anyio

TENANTS = [f"t{i}" for i in range(8)]
KEYS = {tenant: f"sk-load-{tenant}" for tenant in TENANTS}
MODELS = ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"]
#: The issue asks for 10,000; this runs in a few seconds in-process (see benchmarks/README).
REQUESTS = 10_000
CONCURRENCY = 50


def load_config_data(upstream_url: str, **metering: Any) -> dict[str, Any]:
    hasher = KeyHasher()
    return {
        "tenants": [
            {
                "id": tenant,
                "tier": "enterprise",
                "keys": [{"id": f"{tenant}-key", "hash": hasher.hash(KEYS[tenant])}],
            }
            for tenant in TENANTS
        ],
        "upstreams": [{"name": "fake", "base_url": upstream_url, "models": MODELS}],
        "metering": {"request_log": False, **metering},
    }


def _body(i: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODELS[i % 4],
        "messages": [{"role": "user", "content": "x" * (i % 37)}],
        "max_tokens": 1 + i % 9,
    }
    if i % 3 == 0:
        body["stream"] = True
        if i % 2:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def _call(app: Any, tenant: str, body: bytes, request_id: str) -> int:
    status = 0
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [
            (b"authorization", f"Bearer {KEYS[tenant]}".encode()),
            (b"x-request-id", request_id.encode()),
        ],
        "query_string": b"",
    }
    await app(scope, receive, send)
    return status


@pytest.mark.slow
async def test_ledger_totals_equal_the_upstreams_counts_per_tenant() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=3))
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    config = parse_config(load_config_data("http://upstream.test/v1", ledger_url="memory://"))
    ledger = MemoryLedger()
    gateway = Gateway(config, upstream_client=client, ledger=ledger)
    app = gateway.asgi_app()
    tenant_of: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    next_index = iter(range(REQUESTS))

    async def worker() -> None:
        for i in next_index:
            tenant = TENANTS[i % 8]
            request_id = f"load-{i}"
            tenant_of[request_id] = tenant
            statuses[await _call(app, tenant, _body(i), request_id)] += 1

    started = time.perf_counter()
    async with gateway.running():
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for _ in range(CONCURRENCY):
                    group.start_soon(worker)
    elapsed = time.perf_counter() - started
    assert statuses == {200: REQUESTS}
    expected: Counter[tuple[str, str]] = Counter()
    for request_id, produced in fake.stats.by_request_id.items():
        expected[tenant_of[request_id], "in"] += produced.prompt_tokens
        expected[tenant_of[request_id], "out"] += produced.completion_tokens
    recorded: Counter[tuple[str, str]] = Counter()
    for record in ledger.records.values():
        recorded[record.tenant, "in"] += record.input_tokens
        recorded[record.tenant, "out"] += record.output_tokens
        assert not record.estimated
    assert len(ledger.records) == REQUESTS
    assert recorded == expected
    assert sum(expected.values()) == fake.stats.prompt_tokens + fake.stats.completion_tokens
    print(f"{REQUESTS} requests in {elapsed:.1f}s")


# -- a real gateway process, killed -------------------------------------------------------


def _start_gateway(tmp_path: Path, upstream_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    ledger_path = tmp_path / "ledger.db"
    config_path = tmp_path / "gateway.json"
    data = load_config_data(
        upstream_url + "/v1", ledger_url=f"sqlite:///{ledger_path}", flush_interval_s=0.1
    )
    config_path.write_text(json.dumps(data))
    port = find_free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tenantware.cli",
            "serve",
            "--config",
            str(config_path),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, ledger_path
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the gateway process did not start")


MIN_COMPLETED = 50


async def _load_then_signal(
    url: str, proc: subprocess.Popen[bytes], sig: int, *, run_s: float = 1.5
) -> list[tuple[float, str]]:
    """Load from 8 clients; send ``sig`` after ``run_s`` and at least ``MIN_COMPLETED``
    completed requests (a loaded host is slow: a count, not a time); return (time, id) of
    completed."""
    completed: list[tuple[float, str]] = []
    done = anyio.Event()

    async def client(tenant: str) -> None:
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {KEYS[tenant]}"}, timeout=10
        ) as http:
            while not done.is_set():
                try:
                    response = await http.post("/v1/chat/completions", json=CHAT)
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    completed.append((time.monotonic(), response.headers["x-request-id"]))

    async with anyio.create_task_group() as group:
        for tenant in TENANTS:
            group.start_soon(client, tenant)
        await anyio.sleep(run_s)
        with anyio.fail_after(60):
            while len(completed) <= MIN_COMPLETED:
                await anyio.sleep(0.05)
        proc.send_signal(sig)
        signalled_at = time.monotonic()
        await anyio.to_thread.run_sync(proc.wait, 30)
        done.set()
    return [(t - signalled_at, rid) for t, rid in completed]


async def _ledger_ids(path: Path) -> set[str]:
    ledger = SqliteLedger(path)
    try:
        return {record.request_id for record in await ledger.query()}
    finally:
        await ledger.aclose()


@pytest.mark.slow
async def test_sigterm_under_load_loses_no_record(tmp_path: Path) -> None:
    with serve_in_thread(FakeUpstream(FakeUpstreamConfig(latency_s=0.002))) as upstream:
        proc, url, ledger_path = _start_gateway(tmp_path, upstream)
        completed = await _load_then_signal(url, proc, signal.SIGTERM)
    assert proc.returncode in (
        0,
        -signal.SIGTERM,
    )  # uvicorn re-raises the signal after a clean exit
    assert len(completed) > MIN_COMPLETED
    stored = await _ledger_ids(ledger_path)
    assert {rid for _, rid in completed} <= stored


@pytest.mark.slow
async def test_sigkill_under_load_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    with serve_in_thread(FakeUpstream(FakeUpstreamConfig(latency_s=0.002))) as upstream:
        proc, url, ledger_path = _start_gateway(tmp_path, upstream)
        completed = await _load_then_signal(url, proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    stored = await _ledger_ids(ledger_path)
    lost = [(t, rid) for t, rid in completed if rid not in stored]
    # Flush interval 0.1 s; 0.2 s more for a flush in progress on a loaded 2-core machine.
    recent = [rid for t, rid in completed if t > -0.3]
    oldest = min((t for t, _ in lost), default=0.0)
    print(
        f"completed {len(completed)}, lost {len(lost)} (oldest {oldest:.3f} s),"
        f" completed in the last 0.3 s {len(recent)}"
    )
    assert len(completed) > MIN_COMPLETED
    assert len(lost) <= len(recent)
    assert all(t > -0.3 for t, _ in lost)
