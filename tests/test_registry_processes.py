"""Two ``tenantware serve`` processes on one Redis registry: a change made through one is
applied by the other (the timing of it is in benchmarks/bench_registry.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tenantware.keys import KeyHasher
from tests.servers import find_free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-test-admin"
TRIALS = 5


def _serve(config_path: Path, port: int, cwd: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tenantware.cli", "serve", "--config", str(config_path)]
    return subprocess.Popen(
        [*argv, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway process exited"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not start")


@pytest.fixture
def two_processes(redis_url: str, redis_prefix: str, tmp_path: Path) -> Iterator[list[str]]:
    config = {
        "gateway": {
            "registry_url": redis_url,
            "redis_prefix": redis_prefix,
            # Only pub/sub can bring a change within the test's polling: no version check.
            "registry_check_s": 60,
            "admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}],
        },
        "tenants": [{"id": "acme", "tier": "pro"}],
        "metering": {"enabled": False},
    }
    config_path = tmp_path / "gateway.json"
    config_path.write_text(json.dumps(config))
    ports = [find_free_port(), find_free_port()]
    procs = [_serve(config_path, port, tmp_path) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, proc in zip(urls, procs, strict=True):
            _ready(url, proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _until(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    for _ in range(100_000):
        if check():
            return
        assert time.monotonic() < deadline, "never converged"
        time.sleep(0.005)
    raise AssertionError("never converged")


def test_a_key_revoked_through_one_process_is_refused_by_the_other(
    two_processes: list[str],
) -> None:
    one, two = two_processes
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=one, headers=admin) as api, httpx.Client(base_url=two) as other:
        for trial in range(TRIALS):
            issued = api.post("/admin/tenants/acme/keys", json={"id": f"k{trial}"})
            assert issued.status_code == 201, issued.text
            key = {"authorization": f"Bearer {issued.json()['key']}"}

            def status(key: dict[str, str] = key) -> int:
                return other.get("/admin/tenants/acme", headers=key).status_code

            _until(lambda: status() == 200)
            revoked = api.post(f"/admin/tenants/acme/keys/k{trial}/revoke")
            assert revoked.status_code == 200
            _until(lambda: status() == 401)
        # A limit raised through one process is what the other reports for the tenant.
        raised = api.patch("/admin/tenants/acme", json={"limits": {"requests_per_minute": 9000}})
        assert raised.status_code == 200
        version = raised.json()["version"]

        def applied() -> bool:
            ready = other.get("/readyz").json()["registry"]
            return bool(ready["version"] >= version and ready["status"] == "ok")

        _until(applied)
