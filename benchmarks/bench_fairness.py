"""Fair-share admission against the real proxy: the fake upstream and the gateway on loopback.

Scenarios (each on a fresh gateway, seats = upstream capacity, memory backend):

* ``weighted``: three tenants (weights 0.5 / 0.35 / 0.15) all backlogged. Prints per-window
  shares of weighted tokens (input + 2 x output, from the usage each response reports), the
  weighted Jain index, p50/p99 queue wait per tenant; saves a PNG of served tokens over time.
* ``noisy``: B and C send at half their fair share, A floods at 10x its share. Run without A,
  with A under the fair scheduler, with A and guaranteed seats, and with A under plain FIFO.
  Prints B's and C's p99 end-to-end latency against the A-absent run, and A's rejections.

Usage: ``python benchmarks/bench_fairness.py [--seconds 20] [--plot benchmarks/fairness.png]``
(needs the ``bench`` extra for the plot).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tenantware import Gateway, KeyHasher, parse_config
from tenantware.testing import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig

WEIGHTS = {"A": 0.5, "B": 0.35, "C": 0.15}
SEATS = 32
LATENCY_S = 0.8
CAPACITY = SEATS / LATENCY_S  # requests per second


@dataclass
class Done:
    tenant: str
    sent: float
    done: float
    status: int
    wait_s: float
    tokens: int


def gateway_config(upstream_url: str, admission: dict[str, Any]) -> Any:
    hasher = KeyHasher()
    return parse_config(
        {
            "tenants": [
                {
                    "id": name,
                    "tier": "pro",
                    "weight": weight,
                    "keys": [{"id": f"{name}-1", "hash": hasher.hash(f"sk-bench-{name}")}],
                }
                for name, weight in WEIGHTS.items()
            ],
            "upstreams": [
                {"name": "fake", "base_url": f"{upstream_url}/v1", "models": ["gpt-4.1"]}
            ],
            "admission": {"seats": SEATS, "max_queue_per_tenant": 128, **admission},
        }
    )


async def one(client: httpx.AsyncClient, tenant: str, rng: random.Random, out: list[Done]) -> None:
    body = {
        "model": "gpt-4.1",
        "max_tokens": rng.randint(50, 200),
        "messages": [{"role": "user", "content": "benchmark " * rng.randint(10, 60)}],
    }
    sent = time.perf_counter()
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer sk-bench-{tenant}"}
    )
    tokens = 0
    if response.status_code == 200:
        usage = response.json()["usage"]
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
                await one(client, tenant, rng, out)

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


async def weighted(upstream_url: str, seconds: float, plot: str | None) -> None:
    gateway = Gateway(gateway_config(upstream_url, {}))
    with serve_in_thread(gateway.asgi_app(), lifespan="on") as url:
        out, started = await drive(url, seconds, backlog=dict.fromkeys(WEIGHTS, 3 * SEATS))
    print(f"\n## weighted: 3 tenants backlogged, {SEATS} seats x {LATENCY_S}s, {seconds:.0f}s")
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
        print(
            f"  {name} (w={WEIGHTS[name]}): {len(waits)} served, wait p50 "
            f"{pct(waits, 0.5) * 1000:.0f} ms, p99 {pct(waits, 0.99) * 1000:.0f} ms"
        )
    ok = [d for d in out if d.status == 200 and d.done - started >= 5.0]
    span = max(d.done for d in ok) - min(d.done for d in ok)
    print(f"  throughput {len(ok) / span:.1f} req/s of {CAPACITY:.0f} possible")
    if plot:
        save_plot(out, started, plot)


def save_plot(out: list[Done], started: float, path: str) -> None:
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
    ax.set_xlabel("seconds")
    ax.set_ylabel("weighted tokens served (input + 2 x output)")
    ax.set_title(f"Fair-share admission: 3 backlogged tenants, {SEATS} upstream seats")
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
        "fair + reserved": ({"tenant_reserved_seats": {"B": 12, "C": 7}}, {**flood, **quiet}),
        "fifo": ({"scheduler": "fifo", "max_queue_per_tenant": 384}, {**flood, **quiet}),
    }
    print(f"\n## noisy neighbour: B, C at half share, A at 10x; {seconds:.0f}s per run")
    base: dict[str, float] = {}
    for label, (admission, rates) in runs.items():
        gateway = Gateway(gateway_config(upstream_url, admission))
        with serve_in_thread(gateway.asgi_app(), lifespan="on") as url:
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--noisy-seconds", type=float, default=12.0)
    parser.add_argument("--plot", default="benchmarks/fairness.png")
    args = parser.parse_args()
    fake = FakeUpstream(
        FakeUpstreamConfig(latency_s=LATENCY_S, completion_tokens=200, record_requests=False)
    )
    with serve_in_thread(fake) as upstream_url:
        await weighted(upstream_url, args.seconds, args.plot)
        await noisy(upstream_url, args.noisy_seconds)


if __name__ == "__main__":
    asyncio.run(main())
