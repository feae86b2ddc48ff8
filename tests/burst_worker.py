"""One gateway process for the burst proofs of issue 13 (run as ``python -m``).

It wraps an inner app (holds each request its tenant's ``hold_s``, reports usage equal to the
estimate) in the full stack on a shared Redis, prints ``ready``, reads the common wall-clock
start time from stdin, then, for every tenant of the job at once, either sends its
``requests`` requests at once (``burst``) or keeps ``loops`` request loops going for
``duration_s`` (``steady``). It prints JSON (the last line of stdout): per request (tenant,
sent, answered, status), per admitted request its tenant, inner-app interval and tokens, and
its store-failure counters, sampled over time. The parent's side (``workers``,
``cpu_hogs``) is here too, shared by ``tests/test_bursts.py`` and ``benchmarks/bench_burst.py``.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec

from tenantware import Gateway, KeyHasher, get_context, metrics, parse_config
from tenantware.context import Usage
from tenantware.types import Receive, Scope, Send

#: A tenant without limits: its warm-up request charges nothing the proofs count.
WARM = "warm"


class Load(msgspec.Struct, frozen=True):
    """One tenant's limits and traffic."""

    limits: dict[str, Any] = {}
    requests: int = 0
    loops: int = 0
    hold_s: float = 0.0


class Job(msgspec.Struct, frozen=True):
    redis_url: str
    prefix: str
    tenants: dict[str, Load]
    mode: str = "burst"
    duration_s: float = 0.0
    gateway: dict[str, Any] = {}
    admission: dict[str, Any] = {}
    #: Time every quota decision (the store's ``reserve`` as the quota layer awaits it).
    time_decisions: bool = False


class Report(msgspec.Struct):
    calls: list[tuple[str, float, float, int]]
    inner: list[tuple[str, float, float, int]]
    failures: list[tuple[float, dict[str, float]]]
    #: Seconds per quota decision (``time_decisions``).
    decisions: list[float] = []
    #: Log lines of the process (filled in by the test from its stdout).
    logs: list[str] = []


def config(job: Job) -> dict[str, Any]:
    return {
        "gateway": {"redis_url": job.redis_url, "redis_prefix": job.prefix, **job.gateway},
        "admission": job.admission,
        "metering": {"enabled": False},
        "tiers": {"plain": {}},
        "tenants": [
            {
                "id": name,
                "tier": "plain",
                "limits": load.limits,
                "keys": [{"id": f"{name}-1", "hash": KeyHasher().hash(f"sk-{name}")}],
            }
            for name, load in {**job.tenants, WARM: Load()}.items()
        ],
        "upstreams": [
            {"name": "fake", "base_url": "http://upstream.test/v1", "models": ["gpt-4.1"]}
        ],
    }


def failure_counts() -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in metrics.REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "tenantware_store_failures_total":
                out[f"{sample.labels['layer']}:{sample.labels['policy']}"] = sample.value
    return out


async def main(job: Job) -> Report:
    gateway = Gateway(parse_config(config(job)))
    report = Report(calls=[], inner=[], failures=[])

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx.tenant is not None
        name = ctx.tenant.id
        await receive()
        started = time.time()
        await anyio.sleep(job.tenants[name].hold_s if name in job.tenants else 0.0)
        usage = Usage(input_tokens=ctx.estimated_prompt_tokens, output_tokens=100)
        ctx.usage = usage
        tokens = usage.input_tokens + usage.output_tokens
        report.inner.append((name, started, time.time(), tokens))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    if job.time_decisions:
        store = gateway.quota_store
        reserve = store.reserve

        async def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return await reserve(*args)
            finally:
                report.decisions.append(time.perf_counter() - started)

        store.reserve = timed  # type: ignore[method-assign]
    app = gateway.wrap(inner)
    body = {"model": "gpt-4.1", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        gateway.running(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", limits=limits
        ) as client,
    ):

        async def one(name: str) -> None:
            headers = {"authorization": f"Bearer sk-{name}"}
            sent = time.time()
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            report.calls.append((name, sent, time.time(), response.status_code))

        async def loop(name: str) -> None:
            while time.time() < stop_at:
                await one(name)
                await anyio.sleep(0.01)

        async def sample() -> None:
            while True:
                report.failures.append((time.time(), failure_counts()))
                await anyio.sleep(0.05)

        # Warm: one request connects every store (its answer is not part of the report).
        await one(WARM)
        report.calls.clear()
        report.inner.clear()
        report.decisions.clear()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        start_at = float(await anyio.to_thread.run_sync(sys.stdin.readline))
        stop_at = start_at + job.duration_s
        await anyio.sleep(max(0.0, start_at - time.time()))
        async with anyio.create_task_group() as group:
            group.start_soon(sample)
            async with anyio.create_task_group() as traffic:
                for name, load in job.tenants.items():
                    if job.mode == "burst":
                        for _ in range(load.requests):
                            traffic.start_soon(one, name)
                    else:
                        for _ in range(load.loops):
                            traffic.start_soon(loop, name)
            report.failures.append((time.time(), failure_counts()))
            group.cancel_scope.cancel()
    return report


# -- the parent's side -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
HOG = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: pass"


@contextlib.contextmanager
def cpu_hogs(seconds: float, count: int = 2) -> Iterator[None]:
    """``count`` busy-looping processes (one per core here), each gone after ``seconds``."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG, repr(seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=5)


@contextlib.contextmanager
def workers(jobs: list[Job], timeout_s: float = 40.0) -> Iterator[Callable[[], float]]:
    """Start one process per job; ``go()`` (once all are ready) starts them together and
    returns the start time. Their reports are in ``REPORTS`` after the block."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.burst_worker", msgspec.json.encode(job).decode()],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # unbuffered: ``select`` sees every byte not yet read
        )
        for job in jobs
    ]
    REPORTS.clear()
    early: list[list[str]] = [[] for _ in procs]
    try:
        deadline = time.monotonic() + timeout_s
        for proc, lines in zip(procs, early, strict=True):
            assert proc.stdout is not None
            while True:  # until it has imported and connected (log lines may come first)
                left = max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([proc.stdout], [], [], left)
                line = proc.stdout.readline() if ready else b""
                if line == b"ready\n":
                    break
                if not line:  # gone, or not ready in time
                    for other in procs:
                        other.kill()
                    assert proc.stderr is not None
                    raise AssertionError(proc.stderr.read().decode()[-3000:] or lines)
                lines.append(line.decode().rstrip())

        def go() -> float:
            start_at = time.time() + 0.2
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"{start_at!r}\n".encode())
                proc.stdin.flush()
            return start_at

        yield go
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, err.decode()[-3000:]
            lines = out.splitlines()
            report = msgspec.json.decode(lines[-1], type=Report)
            report.logs = [line.decode() for line in lines[:-1] if line.strip()][-20:]
            REPORTS.append(report)
        for report, lines in zip(REPORTS, early, strict=True):
            report.logs = lines + report.logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


#: The reports of the last ``workers`` block.
REPORTS: list[Report] = []


if __name__ == "__main__":
    job = msgspec.json.decode(sys.argv[1], type=Job)
    result = anyio.run(main, job)
    # The last line: logs (a store outage is logged) may come before it on stdout.
    sys.stdout.write("\n" + msgspec.json.encode(result).decode() + "\n")
