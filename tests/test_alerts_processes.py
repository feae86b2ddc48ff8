"""Two ``tenantware serve`` processes on one Redis: an alert fires once and resolves once,
whichever process served the requests behind it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest

from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream
from tests.alert_support import (
    SECRET,
    SECRET_ENV,
    TENANT_SECRET,
    TENANT_SECRET_ENV,
    alert_config,
    receiver,
)
from tests.servers import find_free_port
from tests.support import CHAT, KEYS
from tests.test_registry_processes import _ready, _serve

pytestmark = pytest.mark.slow


def _until(predicate: Callable[[], bool], action: Callable[[], None], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        action()
        time.sleep(0.05)


def test_an_alert_fires_once_across_two_serve_processes(
    redis_url: str, redis_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TENANT_SECRET_ENV, TENANT_SECRET)
    fake = FakeUpstream()
    fake.config.failure_rate = 1.0
    with receiver() as (hooks, hook_url), serve_in_thread(fake) as upstream_url:
        config = alert_config(
            hook_url,
            [
                {
                    "id": "errors",
                    "kind": "error_rate",
                    "scope": "tenant",
                    "threshold": 0.5,
                    "window_s": 120,
                    "min_requests": 6,
                }
            ],
            upstream_url=f"{upstream_url}/v1",
            breaker={"enabled": False},
            gateway={"redis_url": redis_url, "redis_prefix": redis_prefix},
        )
        path = tmp_path / "gateway.json"
        path.write_text(json.dumps(msgspec.to_builtins(config)))
        ports = [find_free_port(), find_free_port()]
        procs = [_serve(path, port, tmp_path) for port in ports]
        try:
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            for url, proc in zip(urls, procs, strict=True):
                _ready(url, proc)
            headers = {"authorization": f"Bearer {KEYS['acme']}"}

            def both() -> None:
                for url in urls:
                    httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)

            for _ in range(3):  # three failures through each: together over the minimum
                both()
            _until(lambda: bool(hooks.delivered("/ops", "firing")), lambda: time.sleep(0.05))
            both()
            fake.config.failure_rate = 0.0
            _until(lambda: bool(hooks.delivered("/ops", "resolved")), both)
            time.sleep(0.5)  # a second sender, if there were one, would have sent by now
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    assert len(hooks.delivered("/ops", "firing")) == 1
    assert len(hooks.delivered("/ops", "resolved")) == 1
    assert len(hooks.delivered("/acme", "firing")) == 1
    assert hooks.at("/hobby") == []
