#!/usr/bin/env python
"""Gateway requests across many tenants on a Redis Cluster of 1 and of 3 masters.

    python benchmarks/bench_cluster.py [--tenants 30] [--requests 3000] [--masters 1 3]

The whole stack (``benchconfig.bench_config``, ``redis+cluster://``) runs in process with
``--tenants`` tenants, requests sent round robin over their keys at ``--concurrency``; the
upstream is the recorded fake of ``test_bench_stack.py``. Per master it reads ``INFO cpu``
and the script calls (``INFO commandstats``) over the run, and names the master of the
global limits' slot (``tw:{*}``) and of the admission pool's (``tw:{adm:*}``): every request
touches both, whatever its tenant. Bounded: ``--requests`` per cluster size, and a
``--max-s`` wall-clock limit per run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchconfig import BENCH_LIMITS, CHAT_BODY, bench_config  # noqa: E402
from test_bench_stack import _RecordingClient, _scope, call_app  # noqa: E402

from tenantware import Gateway, KeyHasher, parse_config  # noqa: E402
from tests.servers import redis_cluster  # noqa: E402

PREFIX = "cl:"


def _config(url: str, tenants: int, workdir: str) -> tuple[dict[str, Any], list[bytes]]:
    config = bench_config(
        "http://upstream.bench/v1",
        backend="redis",
        redis_url=url,
        redis_prefix=PREFIX,
        workdir=workdir,
    )
    # A loaded host stalls the clients for longer than the default outage rule.
    config["gateway"]["redis_timeout_s"] = 2.0
    hasher = KeyHasher()
    keys = [f"sk-cluster-tenant-{i:03d}-0123456789" for i in range(tenants)]
    config["tenants"] = [
        {
            "id": f"t{i:03d}",
            "tier": "enterprise",
            "limits": BENCH_LIMITS,
            "keys": [{"id": f"t{i:03d}-1", "hash": hasher.hash(key)}],
        }
        for i, key in enumerate(keys)
    ]
    return config, [b"Bearer " + key.encode() for key in keys]


async def _drive(app: Any, auths: list[bytes], total: int, concurrency: int, max_s: float) -> int:
    base = _scope("/v1/chat/completions", CHAT_BODY)
    deadline = time.monotonic() + max_s
    sent = 0

    def ok(status: int) -> None:
        assert status == 200, status

    async def one(auth: bytes) -> None:
        scope = dict(base)
        scope["headers"] = [
            (name, auth if name == b"authorization" else value) for name, value in base["headers"]
        ]
        await call_app(app, scope, CHAT_BODY, ok)

    queue = iter(range(total))

    async def worker() -> None:
        nonlocal sent
        for i in queue:
            if time.monotonic() > deadline:
                return
            await one(auths[i % len(auths)])
            sent += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent


async def _node_stats(urls: list[str]) -> list[dict[str, float]]:
    import redis.asyncio as aioredis

    out = []
    for url in urls:
        client = aioredis.Redis.from_url(url)
        cpu = await client.info("cpu")
        stats = await client.info("commandstats")
        await client.aclose()
        scripts = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        out.append({"cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"], "scripts": float(scripts)})
    return out


def _owner(urls: list[str], key: str) -> int:
    """Index in ``urls`` of the master serving ``key``'s slot."""
    import redis

    first = redis.Redis.from_url(urls[0])
    slot = int(first.execute_command("CLUSTER", "KEYSLOT", key))
    ranges = first.execute_command("CLUSTER", "SLOTS")
    first.close()
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in urls]
    for start, end, master, *_ in ranges:
        if int(start) <= slot <= int(end):
            return ports.index(int(master[1]))
    return -1


async def measure(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config, auths = _config("redis+cluster://" + urls[0].split("://", 1)[1], args.tenants, tmp)
        gateway = Gateway(parse_config(config), upstream_client=_RecordingClient())
        app = gateway.wrap(gateway.proxy)
        async with gateway.running():
            await _drive(app, auths, 2 * args.tenants, args.concurrency, args.max_s)  # warm
            before = await _node_stats(urls)
            started, cpu0 = time.perf_counter(), time.process_time()
            sent = await _drive(app, auths, args.requests, args.concurrency, args.max_s)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
            after = await _node_stats(urls)
    return {
        "sent": sent,
        "wall": wall,
        "gateway_cpu": cpu,
        "nodes": [
            {k: a[k] - b[k] for k in ("cpu", "scripts")} for a, b in zip(after, before, strict=True)
        ],
        "global": _owner(urls, PREFIX + "tw:{*}"),
        "pool": _owner(urls, PREFIX + "tw:{adm:*}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=30)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--masters", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--max-s", type=float, default=120.0)
    args = parser.parse_args()
    print(
        "| masters | requests | gateway req/s | gateway CPU µs/req | master | role |"
        " Redis CPU µs/req | scripts/req |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for masters in args.masters:
        with redis_cluster(masters) as urls:
            result = asyncio.run(measure(urls, args))
        sent = result["sent"]
        for index, node in enumerate(result["nodes"]):
            role = " + ".join(
                name
                for name, owner in (("global limits", result["global"]), ("pool", result["pool"]))
                if owner == index
            )
            print(
                f"| {masters} | {sent} | {sent / result['wall']:.0f} |"
                f" {result['gateway_cpu'] / sent * 1e6:.0f} | {index + 1} | {role or 'tenants'} |"
                f" {node['cpu'] / sent * 1e6:.0f} | {node['scripts'] / sent:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
