"""Fair-share admission against the real proxy: the fake upstream and the gateway on loopback.

The fake upstream and the gateway (``tenantware serve``, uvicorn) run as separate processes,
so the load generator here does not steal the gateway's CPU (on a loaded machine, event-loop
lag would otherwise show up as queue wait).

Scenarios (each on a fresh gateway, seats = upstream capacity, memory backend):

* ``weighted``: three tenants (weights 0.5 / 0.35 / 0.15) all backlogged. Prints per-window
  shares of weighted tokens (input + 2 x output, from the usage each response reports), the
  weighted Jain index, p50/p99 queue wait per tenant; saves a PNG of served tokens over time.
* ``noisy``: B and C send at half their fair share, A floods at 10x its share. Run without A,
  with A under the fair scheduler, with A and guaranteed seats, and with A under plain FIFO.
  Prints B's and C's p99 end-to-end latency against the A-absent run, and A's rejections.
* ``long``: issue 14's noisy neighbour with long requests, on its own upstream (20 ms + 3 ms
  per output token) and 8 seats. B (0.35) and C (0.15) each run 2 closed-loop clients asking
  64 tokens; A (0.5) runs 20 asking 256. B's and C's p99 latency against the A-absent run
  under FIFO, plain VTC (``headroom_seats = 0``), one headroom seat, the default (two), with
  ``tenant_reserved_seats = {B = 2, C = 2}``, and the throughput of each run; saves a plot.

Usage: ``python benchmarks/bench_fairness.py [--seconds 20] [--plot benchmarks/fairness.png]``
``[--scenario long] [--redis redis://127.0.0.1:6379/0]`` (needs the ``bench`` extra for the
plots; with ``--redis`` the gateway runs as two processes sharing that Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's tests/ helpers

from tenantware import KeyHasher, parse_config  # noqa: E402
from tests.servers import find_free_port  # noqa: E402

WEIGHTS = {"A": 0.5, "B": 0.35, "C": 0.15}
SEATS = 16
#: Upstream time = latency + one chunk delay per output token: 0.3 to 0.9 s. Variable service
#: matters: with one fixed latency all seats would free in lockstep, once per latency.
LATENCY_S = 0.1
CHUNK_DELAY_S = 0.02
MIN_OUT, MAX_OUT = 10, 40
MEAN_SERVICE_S = LATENCY_S + CHUNK_DELAY_S * (MIN_OUT + MAX_OUT + 2) / 2
CAPACITY = SEATS / MEAN_SERVICE_S  # requests per second


@dataclass
class Done:
    tenant: str
    sent: float
    done: float
    status: int
    wait_s: float
    tokens: int


#: Set by ``--redis URL``: the gateway runs two processes on that Redis.
REDIS_URL: str | None = None


def gateway_config(
    upstream_url: str, admission: dict[str, Any], seats: int = SEATS, port: int = 0
) -> dict[str, Any]:
    hasher = KeyHasher()
    data = {
        "tenants": [
            {
                "id": name,
                "tier": "pro",
                "weight": weight,
                "keys": [{"id": f"{name}-1", "hash": hasher.hash(f"sk-bench-{name}")}],
            }
            for name, weight in WEIGHTS.items()
        ],
        "upstreams": [{"name": "fake", "base_url": f"{upstream_url}/v1", "models": ["gpt-4.1"]}],
        "admission": {"seats": seats, "max_queue_per_tenant": 128, **admission},
    }
    if REDIS_URL:
        # Two gateway processes share one Redis pool (``serve --workers 2``).
        data["gateway"] = {"redis_url": REDIS_URL, "redis_prefix": f"bench{os.getpid()}-{port}:"}
    parse_config(data)  # fail here, not in the child, on a bad configuration
    return data


@contextlib.contextmanager
def process(args: list[str], port: int) -> Iterator[str]:
    """Run a server process from this checkout; yield its URL once it answers.

    Its stdout (the gateway's one log line per request) is dropped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{url}/healthz", timeout=1)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def gateway(upstream_url: str, admission: dict[str, Any], seats: int = SEATS) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.json"
        port = find_free_port()
        path.write_text(json.dumps(gateway_config(upstream_url, admission, seats, port)))
        cli = "import sys; from tenantware.cli import main; sys.exit(main())"
        args = ["-c", cli, "serve", "--config", str(path), "--port", str(port)]
        if REDIS_URL:
            args += ["--workers", "2"]
        with process(args, port) as url:
            yield url


async def one(
    client: httpx.AsyncClient,
    tenant: str,
    rng: random.Random,
    out: list[Done],
    max_tokens: int | None = None,
) -> None:
    """One streamed completion; its upstream time grows with its output (variable service)."""
    body = {
        "model": "gpt-4.1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens or rng.randint(MIN_OUT, MAX_OUT),
        "messages": [{"role": "user", "content": "benchmark " * rng.randint(10, 60)}],
    }
    sent = time.perf_counter()
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer sk-bench-{tenant}"}
    )
    tokens = 0
    if response.status_code == 200:
        for line in response.text.splitlines():
            if line.startswith("data: {") and '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
                tokens = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    wait_ms = response.headers.get("x-tenantware-queue-wait-ms", "0")
    out.append(
        Done(tenant, sent, time.perf_counter(), response.status_code, int(wait_ms) / 1000, tokens)
    )


async def drive(
    url: str,
    seconds: float,
    *,
    backlog: dict[str, int] | None = None,
    rates: dict[str, float] | None = None,
    lengths: dict[str, int] | None = None,
) -> tuple[list[Done], float]:
    """Closed-loop tenants (``backlog``: requests kept outstanding) and open-loop ones."""
    out: list[Done] = []
    rng = random.Random(11)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    started = time.perf_counter()
    deadline = started + seconds
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def closed(tenant: str) -> None:
            while time.perf_counter() < deadline:
                await one(client, tenant, rng, out, (lengths or {}).get(tenant))

        async def opened(tenant: str, rate: float) -> None:
            tasks: set[asyncio.Task[None]] = set()
            while time.perf_counter() < deadline:
                await asyncio.sleep(rng.expovariate(rate))
                if len(tasks) < 600:
                    task = asyncio.create_task(one(client, tenant, rng, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

        jobs = [closed(t) for t, n in (backlog or {}).items() for _ in range(n)]
        jobs += [opened(t, r) for t, r in (rates or {}).items()]
        await asyncio.gather(*jobs)
    return out, started


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def jain(served: dict[str, float]) -> float:
    xs = [served[name] / WEIGHTS[name] for name in served]
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else math.nan


async def weighted(
    upstream_url: str, seconds: float, plot: str | None, admission: dict[str, Any] | None = None
) -> None:
    with gateway(upstream_url, admission or {}) as url:
        out, started = await drive(url, seconds, backlog=dict.fromkeys(WEIGHTS, 3 * SEATS))
    print(
        f"\n## weighted: 3 tenants backlogged, {SEATS} seats, mean upstream time"
        f" {MEAN_SERVICE_S:.2f}s, {seconds:.0f}s, admission {admission or 'default'}"
    )
    window = 5.0
    print(f"{'window':>10} " + " ".join(f"{n:>8}" for n in WEIGHTS) + "     jain")
    t = 5.0
    while t + window <= seconds + 1e-9:
        served = dict.fromkeys(WEIGHTS, 0.0)
        for d in out:
            if d.status == 200 and t <= d.done - started < t + window:
                served[d.tenant] += d.tokens
        total = sum(served.values()) or 1.0
        shares = " ".join(f"{served[n] / total:8.3f}" for n in WEIGHTS)
        print(f"{t:4.0f}-{t + window:<4.0f}s {shares} {jain(served):8.4f}")
        t += window
    for name in WEIGHTS:
        waits = [d.wait_s for d in out if d.tenant == name and d.status == 200]
        failed = Counter(d.status for d in out if d.tenant == name and d.status != 200)
        print(
            f"  {name} (w={WEIGHTS[name]}): {len(waits)} served, wait p50 "
            f"{pct(waits, 0.5) * 1000:.0f} ms, p99 {pct(waits, 0.99) * 1000:.0f} ms"
            + (f", errors {dict(failed)}" if failed else "")
        )
    ok = [d for d in out if d.status == 200 and d.done - started >= 5.0]
    span = max(d.done for d in ok) - min(d.done for d in ok)
    tokens = sum(d.tokens for d in ok) / span
    print(
        f"  throughput {len(ok) / span:.1f} req/s of {CAPACITY:.0f} possible,"
        f" {tokens:.0f} weighted tokens/s"
    )
    if plot:
        save_plot(out, started, plot, seconds)


def save_plot(out: list[Done], started: float, path: str, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, weight in WEIGHTS.items():
        done = sorted((d.done - started, d.tokens) for d in out if d.tenant == name)
        total, xs, ys = 0, [], []
        for at, tokens in done:
            total += tokens
            xs.append(at)
            ys.append(total)
        ax.plot(xs, ys, label=f"tenant {name} (weight {weight})")
    ax.set_xlim(0, seconds)  # after it, only the queues drain
    ax.set_xlabel("seconds")
    ax.set_ylabel("weighted tokens served (input + 2 x output)")
    ax.set_title(f"Fair-share admission: 3 backlogged tenants, {SEATS} upstream seats")
    ax.axvline(5.0, color="grey", linestyle=":", label="warm-up ends")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"  plot saved to {path}")


async def noisy(upstream_url: str, seconds: float) -> None:
    quiet = {"B": 0.5 * 0.35 * CAPACITY, "C": 0.5 * 0.15 * CAPACITY}
    flood = {"A": 10 * 0.5 * CAPACITY}
    runs = {
        "A absent": ({}, quiet),
        "fair": ({}, {**flood, **quiet}),
        "fair + reserved": ({"tenant_reserved_seats": {"B": 6, "C": 4}}, {**flood, **quiet}),
        "fifo": ({"scheduler": "fifo", "max_queue_per_tenant": 384}, {**flood, **quiet}),
    }
    print(f"\n## noisy neighbour: B, C at half share, A at 10x; {seconds:.0f}s per run")
    base: dict[str, float] = {}
    for label, (admission, rates) in runs.items():
        with gateway(upstream_url, admission) as url:
            out, started = await drive(url, seconds, rates=rates)
        cells = []
        for name in ("B", "C"):
            e2e = [d.done - d.sent for d in out if d.tenant == name and d.sent - started >= 3]
            p99 = pct(e2e, 0.99)
            if label == "A absent":
                base[name] = p99
            wait = pct([d.wait_s for d in out if d.tenant == name and d.sent - started >= 3], 0.99)
            cells.append(
                f"{name} p99 {p99 * 1000:5.0f} ms ({p99 / base[name]:.2f}x,"
                f" wait {wait * 1000:4.0f})"
            )
        a = [d for d in out if d.tenant == "A"]
        rejected = sum(1 for d in a if d.status in (429, 503))
        quiet_rejected = sum(1 for d in out if d.tenant != "A" and d.status != 200)
        a_wait = pct([d.wait_s for d in a if d.status == 200], 0.99)
        print(
            f"  {label:16} {'  '.join(cells)}  | A: {len(a)} sent, {rejected} rejected, "
            f"wait p99 {a_wait * 1000:.0f} ms | B/C errors {quiet_rejected}"
        )


#: Issue 14's upstream: 20 ms to the first token, then 3 ms per output token.
LONG_LATENCY_S = 0.02
LONG_CHUNK_S = 0.003
LONG_SEATS = 8
LONG_LENGTHS = {"A": 256, "B": 64, "C": 64}


async def long_noisy(upstream_url: str, seconds: float, plot: str | None) -> None:
    quiet = {"B": 2, "C": 2}
    noisy = {"A": 20, **quiet}
    reserved = {"tenant_reserved_seats": {"B": 2, "C": 2}}
    runs: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
        "A absent": ({}, quiet),
        "FIFO": ({"scheduler": "fifo", "max_queue_per_tenant": 384}, noisy),
        "fair, headroom 0": ({"headroom_seats": 0}, noisy),
        "fair, headroom 1": ({"headroom_seats": 1}, noisy),
        "fair, headroom 2 (default)": ({}, noisy),
        "fair, headroom 4": ({"headroom_seats": 4}, noisy),
        "reserved 2+2, headroom 0": ({**reserved, "headroom_seats": 0}, noisy),
        "reserved 2+2, headroom 2": (reserved, noisy),
        "A absent (again)": ({}, quiet),
    }
    print(
        f"\n## long noisy neighbour: {LONG_SEATS} seats, upstream 20 ms + 3 ms/token; B, C 2"
        f" clients x 64 tokens, A 20 x 256; {seconds:.0f}s per run"
    )
    base: dict[str, float] = {}
    ratios: dict[str, dict[str, float]] = {}
    waits: dict[str, dict[str, float]] = {}
    for label, (admission, backlog) in runs.items():
        with gateway(upstream_url, admission, LONG_SEATS) as url:
            out, started = await drive(url, seconds, backlog=backlog, lengths=LONG_LENGTHS)
        cells = []
        ratios[label] = {}
        waits[label] = {}
        for name in ("B", "C"):
            e2e = [
                d.done - d.sent
                for d in out
                if d.tenant == name and d.sent - started >= 3 and d.status == 200
            ]
            p99 = pct(e2e, 0.99)
            if label == "A absent":
                base[name] = p99
            ratios[label][name] = p99 / base[name]
            wait = pct([d.wait_s for d in out if d.tenant == name and d.sent - started >= 3], 0.99)
            waits[label][name] = wait * 1000
            cells.append(
                f"{name} p99 {p99 * 1000:4.0f} ms ({p99 / base[name]:.2f}x,"
                f" wait {wait * 1000:3.0f})"
            )
        ok = [d for d in out if d.status == 200 and 3 <= d.done - started < seconds]
        tokens = sum(d.tokens for d in ok) / (seconds - 3)
        errors = sum(1 for d in out if d.status != 200)
        print(
            f"  {label:32} {'  '.join(cells)}  | {tokens:6.0f} weighted tokens/s, errors {errors}"
        )
    if plot:
        save_ratio_plot(ratios, waits, plot)


def save_ratio_plot(
    ratios: dict[str, dict[str, float]], waits: dict[str, dict[str, float]], path: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in ratios if label != "A absent"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    width = 0.38
    for ax, values, title in (
        (left, ratios, "p99 latency with A / first run without A"),
        (right, waits, "p99 gateway queue wait (ms)"),
    ):
        for i, name in enumerate(("B", "C")):
            xs = [j + (i - 0.5) * width for j in range(len(labels))]
            ax.bar(xs, [values[label][name] for label in labels], width, label=f"tenant {name}")
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    left.set_yscale("log")
    left.axhline(1.5, color="grey", linestyle=":", label="targets 1.5x and 1.1x")
    left.axhline(1.1, color="grey", linestyle=":")
    right.set_yscale("symlog", linthresh=10)
    left.legend(fontsize=8)
    fig.suptitle("Long noisy neighbour: 8 seats, A 20 clients x 256 tokens, B and C 2 x 64 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"  plot saved to {path}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--noisy-seconds", type=float, default=12.0)
    parser.add_argument("--plot", default="benchmarks/fairness.png")
    parser.add_argument("--long-seconds", type=float, default=20.0)
    parser.add_argument("--redis", help="run the gateway as two processes on this Redis URL")
    parser.add_argument("--long-plot", default="benchmarks/noisy_latency.png")
    parser.add_argument(
        "--scenario", choices=["all", "weighted", "noisy", "long", "fifo"], default="all"
    )
    args = parser.parse_args()
    global REDIS_URL
    REDIS_URL = args.redis
    port = find_free_port()
    upstream = ["-m", "tenantware.testing.upstream", "--port", str(port)]
    upstream += ["--latency-ms", str(LATENCY_S * 1000), "--chunks", str(MAX_OUT)]
    upstream += ["--chunk-delay-ms", str(CHUNK_DELAY_S * 1000)]
    with process(upstream, port) as upstream_url:
        if args.scenario in ("all", "weighted"):
            await weighted(upstream_url, args.seconds, args.plot)
        if args.scenario in ("all", "noisy"):
            await noisy(upstream_url, args.noisy_seconds)
        if args.scenario in ("all", "fifo"):
            # The same load under FIFO (one queue: room for every tenant's backlog).
            fifo = {"scheduler": "fifo", "max_queue_per_tenant": 4 * 3 * SEATS}
            await weighted(upstream_url, args.seconds, None, fifo)
    if args.scenario in ("all", "long"):
        port = find_free_port()
        upstream = ["-m", "tenantware.testing.upstream", "--port", str(port), "--chunks", "1000"]
        upstream += ["--latency-ms", str(LONG_LATENCY_S * 1000)]
        upstream += ["--chunk-delay-ms", str(LONG_CHUNK_S * 1000)]
        with process(upstream, port) as upstream_url:
            await long_noisy(upstream_url, args.long_seconds, args.long_plot)


if __name__ == "__main__":
    asyncio.run(main())
