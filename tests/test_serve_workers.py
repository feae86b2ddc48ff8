"""``tenantware serve --workers 2``: one scrape reports every worker's requests, and without
Redis the start-up warns that each worker keeps its own limits, which is what happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tenantware import KeyHasher
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.servers import find_free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-workers-acme"
ADMIN = "sk-workers-admin"
LIMIT = 5
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Served:
    url: str
    metrics_dir: Path
    process: subprocess.Popen[str]
    stderr_path: Path


def _config(upstream: str, tmp: Path, **gateway: object) -> dict[str, object]:
    hasher = KeyHasher()
    return {
        "tenants": [
            {
                "id": "acme",
                "tier": "plain",
                "limits": {"requests_per_minute": LIMIT},
                "keys": [{"id": "acme-1", "hash": hasher.hash(KEY)}],
            }
        ],
        "tiers": {"plain": {}},
        "upstreams": [
            {"name": "fake", "base_url": f"{upstream}/v1", "models": ["gpt-4.1"]},
            {"name": "relay", "base_url": f"{upstream}/v1"},
        ],
        "metering": {
            "ledger_url": f"sqlite:///{tmp}/ledger.db",
            "admin_key_hash": hasher.hash(ADMIN),
            "request_log": False,
        },
        "migration": {
            "rules": [{"name": "trial", "model": "gpt-4.1", "candidates": [{"upstream": "relay"}]}]
        },
        "gateway": gateway,
    }


@contextmanager
def _serve_two_workers(tmp: Path, config: dict[str, object]) -> Iterator[Served]:
    path = tmp / "gateway.json"
    path.write_text(json.dumps(config))
    port = find_free_port()
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    stderr_path = tmp / "stderr.txt"
    # The test names the metrics directory to read each worker's file; serve makes a
    # temporary one when none is set.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tenantware.cli", "serve", "--config", str(path)),
                *("--port", str(port), "--workers", "2"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        yield Served(url, metrics_dir, process, stderr_path)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two workers, stores in memory, acme limited to ``LIMIT`` requests a minute."""
    tmp = tmp_path_factory.mktemp("workers")
    with (
        serve_in_thread(FakeUpstream(FakeUpstreamConfig(record_requests=False))) as upstream,
        _serve_two_workers(tmp, _config(upstream, tmp)) as served,
    ):
        yield served


def _wait_ready(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail("the gateway did not become ready")


def _requests_per_worker(metrics_dir: Path) -> dict[str, float]:
    """``tenantware_requests_total`` of acme in each worker's own counter file (the workers
    that answered some)."""
    per_worker: dict[str, float] = {}
    for file in metrics_dir.glob("counter_*.db"):
        total = 0.0
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(file)):
            _metric, sample, labels, _help = json.loads(key)
            if sample == "tenantware_requests_total" and labels.get("tenant") == "acme":
                total += value
        if total:  # the serve process itself counts nothing
            per_worker[file.stem.removeprefix("counter_")] = total
    return per_worker


def _scraped_requests(url: str) -> float:
    text = httpx.get(
        url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
    ).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tenantware_requests_total" and sample.labels.get("tenant") == "acme"
    )


def _one_request(url: str) -> int:
    # A new connection each time, so the kernel hands requests to either worker.
    with httpx.Client(timeout=30) as client:
        return client.post(
            url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEY}"}
        ).status_code


@pytest.fixture(scope="module")
def traffic(two_workers: Served) -> list[int]:
    """Requests until each worker has answered more than ``LIMIT`` (bounded: 600, 60 s)."""
    statuses: list[int] = []
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while len(statuses) < 600 and time.monotonic() < deadline:
            statuses += pool.map(_one_request, [two_workers.url] * 16)
            counts = _requests_per_worker(two_workers.metrics_dir)
            if len(counts) == 2 and all(count > LIMIT for count in counts.values()):
                break
    counts = _requests_per_worker(two_workers.metrics_dir)
    assert len(counts) == 2, f"one worker answered every request: {counts}"
    assert all(count > LIMIT for count in counts.values()), counts
    return statuses


def test_a_scrape_reports_the_sum_of_both_workers(two_workers: Served, traffic: list[int]) -> None:
    sent = len(traffic)
    deadline = time.monotonic() + 30
    # Metrics are counted by each worker's ledger writer, a moment after the answer.
    while _scraped_requests(two_workers.url) < sent and time.monotonic() < deadline:
        time.sleep(0.1)
    per_worker = _requests_per_worker(two_workers.metrics_dir)
    assert sum(per_worker.values()) == sent
    # Whichever worker answers the scrape, it reports both (each has less than the sum).
    for _ in range(10):
        assert _scraped_requests(two_workers.url) == sent
    assert all(count < sent for count in per_worker.values())


def test_without_redis_the_start_warns_and_each_worker_keeps_its_own_limit(
    two_workers: Served, traffic: list[int]
) -> None:
    warning = two_workers.stderr_path.read_text()
    assert "WARNING: --workers 2 with in-memory stores" in warning
    assert "every limit is multiplied by 2" in warning
    assert "gateway.redis_url" in warning
    # Each worker granted its own LIMIT requests in the minute: twice the tenant's limit.
    assert traffic.count(200) == 2 * LIMIT
    assert traffic.count(429) == len(traffic) - 2 * LIMIT


def test_without_a_shared_registry_rule_changes_are_refused(two_workers: Served) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    rules = httpx.get(two_workers.url + "/admin/migration/rules", headers=admin, timeout=10)
    migration = httpx.put(
        two_workers.url + "/admin/migration/rules", json=rules.json(), headers=admin, timeout=10
    )
    alerts = httpx.put(
        two_workers.url + "/admin/alerts/rules", json={"data": []}, headers=admin, timeout=10
    )
    assert (migration.status_code, migration.json()["error"]["code"]) == (
        409,
        "migration_rules_not_shared",
    )
    assert (alerts.status_code, alerts.json()["error"]["code"]) == (409, "alert_rules_not_shared")


def _workers_with_share(url: str, share: float) -> set[str]:
    """The workers (``host:pid`` from the report, asked on the same connection as the rules)
    seen with ``share`` in force, once both are (bounded: 300 connections, 30 s)."""
    admin = {"authorization": f"Bearer {ADMIN}"}
    applied: set[str] = set()
    deadline = time.monotonic() + 30
    for _ in range(300):
        with httpx.Client(base_url=url, headers=admin, timeout=10) as client:
            report = client.get("/admin/migration/report").json()
            assert report["scope"] == "shared"
            rules = client.get("/admin/migration/rules").json()
        if rules["rules"][0]["candidates"][0]["canary_percent"] == share:
            applied.add(report["process"])
        if len(applied) == 2 or time.monotonic() > deadline:
            break
    return applied


def test_with_a_shared_registry_a_rule_change_reaches_both_workers(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    shared = {"registry_url": redis_url, "redis_url": redis_url, "redis_prefix": redis_prefix}
    with (
        serve_in_thread(FakeUpstream(FakeUpstreamConfig(record_requests=False))) as upstream,
        _serve_two_workers(tmp_path, _config(upstream, tmp_path, **shared)) as served,
    ):
        admin = {"authorization": f"Bearer {ADMIN}"}
        changed = httpx.patch(
            served.url + "/admin/migration/rules/trial/candidates/relay",
            json={"canary_percent": 25},
            headers=admin,
            timeout=10,
        )
        assert changed.status_code == 200, changed.text
        applied = _workers_with_share(served.url, 25)
    # The worker that did not take the change applies it too (the file says 0).
    assert len(applied) == 2, applied
