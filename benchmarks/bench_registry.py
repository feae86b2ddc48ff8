"""Time from an admin API change to another gateway process applying it (the registry).

Two ``tenantware serve`` processes share one private Redis registry. Each trial issues a key
through process 1, waits until process 2 accepts it, then revokes it through process 1 and
polls process 2 (as fast as one client can) until it refuses the key. Reported: the time from
the revoke's answer, and from its sending, to process 2's first refusal (p50 / p99 / max).

Run: ``python benchmarks/bench_registry.py [--trials 100] [--check-s 1.0] [--kill-pubsub]``
(``--kill-pubsub`` cuts process 2's subscription before each revoke: it must listen again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tenantware.keys import KeyHasher  # noqa: E402
from tests.servers import find_free_port, throwaway_redis  # noqa: E402

ADMIN = "sk-bench-admin"


def _config(redis_url: str, check_s: float) -> dict[str, Any]:
    hasher = KeyHasher()
    return {
        "gateway": {
            "registry_url": redis_url,
            "registry_check_s": check_s,
            "admin_keys": [{"id": "bench", "hash": hasher.hash(ADMIN)}],
        },
        "tenants": [{"id": "bench", "tier": "pro"}],
        "metering": {"enabled": False},
    }


def _serve(config_path: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tenantware.cli", "serve", "--config", str(config_path)]
    return subprocess.Popen(
        [*argv, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not start")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--check-s", type=float, default=1.0)
    parser.add_argument("--kill-pubsub", action="store_true")
    args = parser.parse_args()
    with throwaway_redis() as server, tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "gateway.json"
        config_path.write_text(json.dumps(_config(server.url, args.check_s)))
        ports = [find_free_port(), find_free_port()]
        procs = [_serve(config_path, port) for port in ports]
        try:
            one, two = (f"http://127.0.0.1:{port}" for port in ports)
            for url in (one, two):
                _wait_ready(url)
            admin = httpx.Client(base_url=one, headers={"authorization": f"Bearer {ADMIN}"})
            probe = httpx.Client(base_url=two)
            watcher = redis.Redis.from_url(server.url)
            after_answer: list[float] = []
            after_send: list[float] = []
            polls: list[int] = []
            for trial in range(args.trials):
                issued = admin.post("/admin/tenants/bench/keys", json={"id": f"k{trial}"})
                issued.raise_for_status()
                auth = {"authorization": f"Bearer {issued.json()['key']}"}
                deadline = time.monotonic() + 10
                while probe.get("/admin/tenants/bench", headers=auth).status_code != 200:
                    if time.monotonic() > deadline:
                        raise SystemExit("process 2 never accepted the new key")
                if args.kill_pubsub:
                    for info in watcher.client_list(_type="pubsub"):
                        watcher.client_kill_filter(_id=info["id"])
                sent = time.perf_counter()
                admin.post(f"/admin/tenants/bench/keys/k{trial}/revoke").raise_for_status()
                answered = time.perf_counter()
                count = 0
                deadline = time.monotonic() + 10
                while probe.get("/admin/tenants/bench", headers=auth).status_code != 401:
                    count += 1
                    if time.monotonic() > deadline:
                        raise SystemExit("process 2 never refused the revoked key")
                refused = time.perf_counter()
                after_answer.append((refused - answered) * 1000)
                after_send.append((refused - sent) * 1000)
                polls.append(count)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    mode = "subscription cut before each revoke" if args.kill_pubsub else "pub/sub"
    print(f"{args.trials} revocations, {mode}, registry_check_s={args.check_s}")
    for name, values in (
        ("from the revoke's answer", after_answer),
        ("from its sending", after_send),
    ):
        print(
            f"  {name}: p50 {statistics.median(values):.1f} ms, "
            f"p99 {_percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms"
        )
    stale = statistics.median(polls)
    print(f"  probe requests still answered 200 after the revoke's answer: median {stale}")


if __name__ == "__main__":
    main()
