#!/usr/bin/env python
"""Redis round trips and Redis CPU per gateway request, by script and operation.

    python benchmarks/bench_redis_calls.py [--requests 2000] [--concurrency 1 16]

The whole stack (``benchconfig.bench_config(backend="redis")``: quota, admission, breaker,
metering) runs in process against a private ``redis-server``; the upstream is the recorded
fake of ``test_bench_stack.py`` (no network), so every Redis command comes from the gateway.
Redis's own CPU (``INFO cpu``) and script time (``INFO commandstats``) are read over one pass;
a second pass runs under ``MONITOR``, which names every command a client sent (each
``EVALSHA`` by its script: quota reserve/settle, admission op, breaker) apart from those a
script ran inside Redis. The first pass also counts the writes of the pipelined connection
(``backends/multiplex.py``: every call made in one event-loop turn goes out in one write) and
the gateway's own CPU: at c=1 a write is one round trip the request waits for. The commands a
script ran inside Redis are counted per script (``MONITOR`` lists them right after the call
that ran them), and a third pass with every command in ``SLOWLOG`` times each script call
(the logging slows Redis a little; the figures compare scripts, and one layout with another;
the median is the robust one on a shared host, where a call the kernel preempted counts its
wait in the mean).
Prints a markdown table per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from benchconfig import CHAT_BODY, STREAM_BODY, bench_config  # noqa: E402
from test_bench_stack import _RecordingClient, _scope, call_app  # noqa: E402

from tenantware import Gateway, parse_config  # noqa: E402
from tests.servers import throwaway_redis  # noqa: E402


def _script_names() -> dict[str, str]:
    from tenantware.admission import redis as admission
    from tenantware.breaker import redis as breaker
    from tenantware.quota import redis as quota

    sources = {
        "quota reserve": quota._RESERVE,
        "quota settle": quota._SETTLE,
        "quota usage": quota._USAGE,
        "admission": admission._SCRIPT,
        "breaker": breaker._SCRIPT,
    }
    try:
        from tenantware.joint import redis as joint
    except ImportError:  # a base from before the joint call (A/B with this script)
        pass
    else:
        sources["quota reserve + admission acquire (one script)"] = joint._SCRIPT
        settle_release = getattr(joint, "_SETTLE_RELEASE", None)  # a base from before it
        if settle_release is not None:
            sources["quota settle + admission release (one script)"] = settle_release
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in sources.items()}


def _label(args: list[bytes], names: dict[str, str]) -> str:
    command = args[0].decode().lower()
    if command not in ("evalsha", "eval"):
        return command
    name = names.get(args[1].decode(), "other script") if command == "evalsha" else "eval"
    if name == "admission":
        keys = int(args[2])
        name += " " + args[3 + keys].decode()
    return name


async def _drive(
    app: Any, body: bytes, total: int, concurrency: int, statuses: Counter[int] | None = None
) -> None:
    """``total`` requests; each must answer 200 unless ``statuses`` counts the answers (the
    passes under ``MONITOR``/``SLOWLOG`` slow Redis enough that the gateway may declare an
    outage and a failure policy answer)."""
    scope = _scope("/v1/chat/completions", body)

    def status_seen(status: int) -> None:
        if statuses is None:
            assert status == 200, status
        else:
            statuses[status] += 1

    async def one() -> None:
        await call_app(app, scope, body, status_seen)

    queue = iter(range(total))

    async def worker() -> None:
        for _ in queue:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(url: str, body: bytes, total: int, concurrency: int) -> dict[str, Any]:
    """Two passes of ``total`` requests: Redis's CPU and command statistics, then (under
    ``MONITOR``, which slows Redis) every command a client sent, named."""
    import redis.asyncio as aioredis

    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(
            "http://upstream.bench/v1",
            backend="redis",
            redis_url=url,
            redis_prefix=f"bench{concurrency}:",
            workdir=tmp,
        )
        gateway = Gateway(parse_config(config), upstream_client=_RecordingClient())
        app = gateway.wrap(gateway.proxy)
        admin = aioredis.Redis.from_url(url, socket_timeout=60)
        async with gateway.running():
            await _drive(app, body, 200, concurrency)  # warm: scripts loaded, plans built
            await admin.config_resetstat()
            cpu0 = await admin.info("cpu")
            with _counting_writes() as writes:
                gateway_cpu = time.process_time()
                await _drive(app, body, total, concurrency)
                gateway_cpu = time.process_time() - gateway_cpu
            cpu1 = await admin.info("cpu")
            stats = await admin.info("commandstats")
            calls: Counter[str] = Counter()
            slowed: Counter[int] = Counter()
            names = _script_names()
            async with admin.monitor() as monitor:
                counting = asyncio.create_task(_count(monitor, names, calls))
                await asyncio.sleep(0.2)
                await _drive(app, body, total, concurrency, slowed)
                await asyncio.sleep(0.5)
                counting.cancel()
            chunk = min(total, 250)  # SLOWLOG read and reset every chunk: short replies
            timed = await _timed(
                admin, names, lambda: _drive(app, body, chunk, concurrency, slowed), total // chunk
            )
        await admin.aclose()
    cpu = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user"))
    scripts = {k: v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")}
    return {
        "calls": calls,
        "cpu_us": cpu * 1e6,
        "writes": writes[0],
        "written_calls": writes[1],
        "gateway_cpu_us": gateway_cpu * 1e6,
        "script_calls": sum(v.get("calls", 0) for v in scripts.values()),
        "script_us": sum(v.get("usec", 0) for v in scripts.values()),
        "timed": timed,
        "slowed": slowed,
    }


async def _timed(
    admin: Any, names: dict[str, str], drive: Callable[[], Awaitable[None]], rounds: int
) -> dict[str, list[int]]:
    """``label -> µs of each call`` of every script call while ``drive`` runs ``rounds``
    times, from ``SLOWLOG``."""
    await admin.config_set("slowlog-max-len", 100_000)
    await admin.config_set("slowlog-log-slower-than", 0)
    await admin.slowlog_reset()
    out: dict[str, list[int]] = {}
    try:
        for _ in range(rounds):
            await drive()
            entries = await admin.execute_command("SLOWLOG", "GET", -1)
            await admin.slowlog_reset()
            for entry in entries:
                args = [p if isinstance(p, bytes) else str(p).encode() for p in entry[3]]
                if args and args[0].lower() in (b"evalsha", b"eval"):
                    out.setdefault(_label(args, names), []).append(int(entry[2]))
    finally:
        await admin.config_set("slowlog-log-slower-than", 10_000)
        await admin.slowlog_reset()
    return out


@contextmanager
def _counting_writes() -> Iterator[list[int]]:
    """``[writes, calls written]`` of every pipelined connection while the block runs."""
    from tenantware.backends.multiplex import _Connection

    counts = [0, 0]
    flush = _Connection._flush

    def counted(self: Any) -> None:
        if self._outgoing and not self.closed and self.transport is not None:
            counts[0] += 1
            counts[1] += len(self._outgoing)
        flush(self)

    _Connection._flush = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        _Connection._flush = flush  # type: ignore[method-assign]


async def _count(monitor: Any, names: dict[str, str], calls: Counter[str]) -> None:
    script = "?"  # the script whose commands follow (MONITOR lists a call before them)
    async for event in monitor.listen():
        command = event.get("command", "")
        if event.get("client_type") == "lua" or "[0 lua]" in str(event.get("client_address")):
            calls["(inside scripts) " + command.split(" ")[0].lower()] += 1
            calls["[in] " + script] += 1
            continue
        args = [part.strip('"').encode() for part in command.split(" ")]
        if args and args[0].lower() not in (b"monitor", b"info", b"config"):
            script = _label(args, names)
            calls[script] += 1


def report(mode: str, concurrency: int, total: int, result: dict[str, Any]) -> str:
    calls = result["calls"]
    client = {k: v for k, v in calls.items() if not k.startswith(("(inside", "[in] "))}
    timed = result["timed"]
    inner = sum(v for k, v in calls.items() if k.startswith("(inside"))
    lines = [
        f"\n{mode}, c={concurrency}, {total} requests",
        "",
        "| command sent by the gateway | per request |",
        "|---|---|",
    ]
    lines[-2:] = [
        "| command sent by the gateway | per request | commands inside, per call |"
        " µs in Redis per call (`SLOWLOG`), median / mean |",
        "|---|---|---|---|",
    ]
    for label in sorted(client, key=lambda name: -client[name]):
        inside = calls.get("[in] " + label, 0) / client[label]
        times = timed.get(label)
        per_call = "-"
        if times:
            per_call = f"{statistics.median(times):.0f} / {statistics.mean(times):.0f}"
        lines.append(f"| {label} | {client[label] / total:.2f} | {inside:.1f} | {per_call} |")
    lines.append(f"| **commands sent** | **{sum(client.values()) / total:.2f}** |")
    lines.append(
        f"| **socket writes** (round trips at c=1) | **{result['writes'] / total:.2f}**"
        f" ({result['written_calls'] / total:.2f} calls) |"
    )
    lines.append(f"| (commands run inside those scripts) | {inner / total:.1f} |")
    slowed = {status: n for status, n in result["slowed"].items() if status != 200}
    if slowed:
        lines.append(
            f"\nUnder MONITOR/SLOWLOG the gateway answered {sum(slowed.values())} requests with"
            f" a failure policy ({dict(sorted(slowed.items()))}): Redis was slowed past the"
            " outage bound; the counts above cover what it sent."
        )
    lines.append(
        f"\nRedis CPU (INFO cpu, user + sys): **{result['cpu_us'] / total:.0f} µs per request**;"
        f" scripts (INFO commandstats): {result['script_calls'] / total:.2f} calls, "
        f"{result['script_us'] / total:.0f} µs per request; gateway CPU (process_time): "
        f"{result['gateway_cpu_us'] / total:.0f} µs per request"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    with throwaway_redis() as server:
        for mode, body in (("json", CHAT_BODY), ("stream20", STREAM_BODY)):
            for concurrency in args.concurrency:
                result = asyncio.run(measure(server.url, body, args.requests, concurrency))
                print(report(mode, concurrency, args.requests, result), flush=True)


if __name__ == "__main__":
    main()
