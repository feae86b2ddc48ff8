"""The deployment recipe under load: three ``tenantware serve`` processes behind HAProxy,
sharing Redis and a PostgreSQL ledger, restarted one at a time while requests and streams
run. No client request fails, and the ledger holds exactly one record per request served.

What makes it work (docs/deployment.md): on SIGTERM a gateway stops accepting, finishes its
open requests and streams (``--graceful-timeout``), then flushes its ledger writer; HAProxy
sends nothing to a server whose ``/readyz`` fails or whose port refuses, and re-sends a request
that a closing server never read (``retry-on conn-failure empty-response``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import psycopg
import pytest
from psycopg import sql

from tenantware import KeyHasher
from tests.servers import find_free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-rolling-acme"
GATEWAYS = 3
#: Requests per second of the open-loop load, and its upper bound in time.
RATE = 100
MAX_LOAD_S = 45.0
#: One request in STREAM_EVERY is a stream (20 events, 10 ms apart: in flight at a restart).
STREAM_EVERY = 4
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
HAPROXY_CONFIG = """
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 5
    option redispatch 1
    # Re-send a request that a server closed without reading (it stopped accepting, or
    # closed an idle kept-alive connection as it drained): such a request never ran.
    retry-on conn-failure empty-response
    option http-buffer-request
frontend gateway
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    # Out after 3 failed checks (a loaded host answers a check late, not never); a stopped
    # server refuses connections at once, which the retries above cover meanwhile.
    timeout check 5s
    default-server check inter 300ms fall 3 rise 1
{servers}
"""


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=out,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def _wait_ready(url: str, process: subprocess.Popen[bytes], limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url} exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not become ready")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        pytest.fail("a gateway did not stop within 60 s of SIGTERM")


class Deployment:
    """The fake upstream, the gateways and HAProxy, as processes."""

    def __init__(self, tmp: Path, redis_url: str, redis_prefix: str, ledger_url: str) -> None:
        self.tmp = tmp
        self.upstream_port = find_free_port()
        self.upstream = _spawn(
            [
                *(sys.executable, "-W", "ignore::RuntimeWarning"),
                *("-m", "tenantware.testing.upstream", "--port", str(self.upstream_port)),
                *("--chunks", "20", "--chunk-delay-ms", "10", "--latency-ms", "5"),
            ],
            tmp / "upstream.log",
        )
        _wait_ready(f"http://127.0.0.1:{self.upstream_port}/healthz", self.upstream)
        config = {
            "gateway": {"redis_url": redis_url, "redis_prefix": redis_prefix},
            "tiers": {"plain": {}},
            "tenants": [
                {
                    "id": "acme",
                    "tier": "plain",
                    "keys": [{"id": "acme-1", "hash": KeyHasher().hash(KEY)}],
                }
            ],
            "upstreams": [
                {
                    "name": "fake",
                    "base_url": f"http://127.0.0.1:{self.upstream_port}/v1",
                    "models": ["gpt-4.1"],
                }
            ],
            "metering": {"ledger_url": ledger_url, "request_log": False},
        }
        self.config_path = tmp / "gateway.json"
        self.config_path.write_text(json.dumps(config))
        self.ports = [find_free_port() for _ in range(GATEWAYS)]
        self.gateways = [self._start_gateway(i) for i in range(GATEWAYS)]
        for i, process in enumerate(self.gateways):
            _wait_ready(self.ready_url(i), process)
        self.port = find_free_port()
        servers = "\n".join(
            f"    server gw{i} 127.0.0.1:{port}" for i, port in enumerate(self.ports)
        )
        haproxy_config = tmp / "haproxy.cfg"
        haproxy_config.write_text(HAPROXY_CONFIG.format(port=self.port, servers=servers))
        self.haproxy = _spawn(["haproxy", "-db", "-f", str(haproxy_config)], tmp / "haproxy.log")
        _wait_ready(f"http://127.0.0.1:{self.port}/readyz", self.haproxy)

    def ready_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}/readyz"

    def _start_gateway(self, index: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "tenantware.cli", "serve", "--config"]
        argv += [str(self.config_path), "--port", str(self.ports[index])]
        argv += ["--graceful-timeout", "20"]
        return _spawn(argv, self.tmp / f"gateway-{index}.log")

    def restart(self, index: int) -> int:
        """SIGTERM one gateway, wait for it to drain and exit, start it again, wait ready."""
        code = _stop(self.gateways[index])
        self.gateways[index] = self._start_gateway(index)
        _wait_ready(self.ready_url(index), self.gateways[index])
        return code

    def close(self) -> list[int]:
        codes = [_stop(process) for process in self.gateways]
        for process in (self.haproxy, self.upstream):
            process.terminate()
            process.wait(30)
        return codes


@pytest.fixture
def deployment(
    tmp_path: Path, redis_url: str, redis_prefix: str, postgres_url: str, postgres_schema: str
) -> Iterator[Deployment]:
    sep = "&" if "?" in postgres_url else "?"
    ledger_url = f"{postgres_url}{sep}schema={postgres_schema}"
    started = Deployment(tmp_path, redis_url, redis_prefix, ledger_url)
    try:
        yield started
    finally:
        for process in (*started.gateways, started.haproxy, started.upstream):
            if process.poll() is None:
                process.kill()
                process.wait(10)


async def _one(session: aiohttp.ClientSession, url: str, stream: bool) -> str:
    """``ok``, or what went wrong for the client."""
    try:
        async with session.post(url, json={**CHAT, "stream": stream}) as response:
            body = await response.read()
            if response.status != 200:
                return f"status {response.status}: {body[:200]!r}"
            if stream and not body.rstrip().endswith(b"data: [DONE]"):
                return "stream cut"
            return "ok"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"


async def _load(url: str, restarting: asyncio.Task[list[int]]) -> list[str]:
    """Open loop at RATE until the restarts are done (and one more second), bounded."""
    results: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        tasks: list[asyncio.Task[str]] = []
        started = time.monotonic()
        done_at: float | None = None
        for n in range(int(RATE * MAX_LOAD_S)):
            now = time.monotonic()
            if restarting.done():
                done_at = done_at or now
                if now - done_at > 1.0:
                    break
            if now - started > MAX_LOAD_S:
                break
            tasks.append(asyncio.create_task(_one(session, url, n % STREAM_EVERY == 0)))
            await asyncio.sleep(max(0.0, started + (n + 1) / RATE - time.monotonic()))
        results = list(await asyncio.gather(*tasks))
    return results


def _ledger_count(postgres_url: str, schema: str) -> int:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "usage_records"))
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def test_a_rolling_restart_under_load_loses_no_request_and_no_ledger_record(
    deployment: Deployment, postgres_url: str, postgres_schema: str
) -> None:
    url = f"http://127.0.0.1:{deployment.port}/v1/chat/completions"

    async def scenario() -> tuple[list[str], list[int]]:
        async def restart_all() -> list[int]:
            await asyncio.sleep(1.0)  # the load is running on all three
            codes = []
            for index in range(GATEWAYS):
                codes.append(await asyncio.to_thread(deployment.restart, index))
            return codes

        restarting = asyncio.create_task(restart_all())
        results = await _load(url, restarting)
        return results, await restarting

    results, exit_codes = asyncio.run(scenario())
    final_codes = deployment.close()  # every gateway drains and flushes its ledger writer

    outcomes = Counter(results)
    # uvicorn ends a graceful shutdown by re-raising the SIGTERM it handled.
    graceful = (0, -signal.SIGTERM)
    assert all(code in graceful for code in exit_codes + final_codes), exit_codes + final_codes
    assert len(results) >= RATE * 2, "the load ended before it began"
    assert outcomes == {"ok": len(results)}, outcomes.most_common(5)
    assert _ledger_count(postgres_url, postgres_schema) == len(results)
