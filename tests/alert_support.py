"""A local webhook receiver and alert configurations for the alert tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from tenantware.testing.serve import serve_in_thread
from tenantware.types import Receive, Scope, Send
from tests.support import make_config

SECRET_ENV = "TW_TEST_ALERT_SECRET"
SECRET = "whsec-test-0123456789"
TENANT_SECRET_ENV = "TW_TEST_ALERT_TENANT_SECRET"
TENANT_SECRET = "whsec-tenant-abcdef"


class Hit:
    """One request the receiver got."""

    def __init__(self, path: str, headers: dict[str, str], body: bytes) -> None:
        self.path = path
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An ASGI webhook receiver: records every request; answers 500 to the next
    ``fail_next[path]`` requests of a path, 200 after."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        #: Path -> how many of its next requests are answered 500.
        self.fail_next: dict[str, int] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        with self._lock:
            self.hits.append(Hit(scope["path"], headers, body))
            failing = self.fail_next.get(scope["path"], 0) > 0
            if failing:
                self.fail_next[scope["path"]] -= 1
        status = 500 if failing else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def at(self, path: str) -> list[Hit]:
        with self._lock:
            return [hit for hit in self.hits if hit.path == path]

    def delivered(self, path: str, status: str) -> list[Any]:
        """Distinct payloads (by event id) of ``status`` that reached ``path``."""
        seen: dict[str, Any] = {}
        for hit in self.at(path):
            payload = hit.json()
            if payload.get("status") == status:
                seen[payload["id"]] = payload
        return list(seen.values())


@contextmanager
def receiver() -> Iterator[tuple[Receiver, str]]:
    app = Receiver()
    with serve_in_thread(app) as url:
        yield app, url


def alert_config(
    url: str,
    rules: list[dict[str, Any]],
    *,
    alerts: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """Two tenants' config with an operator webhook (``/ops``), one per tenant (``/acme``,
    ``/hobby``) and short windows, evaluated every 50 ms."""
    section = {
        "destinations": [
            {"id": "ops", "url": f"{url}/ops", "secret_env": SECRET_ENV},
            {"id": "acme", "url": f"{url}/acme", "tenant": "acme", "secret_env": TENANT_SECRET_ENV},
            {"id": "hobby", "url": f"{url}/hobby", "tenant": "hobby"},
        ],
        "rules": rules,
        "evaluate_every_s": 0.05,
        "bucket_s": 0.1,
        "lease_s": 2.0,
        "retry_base_s": 0.02,
        "retry_max_s": 0.1,
        **(alerts or {}),
    }
    metering = {"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.02}
    metering.update(overrides.pop("metering", {}))
    return make_config(alerts=section, metering=metering, **overrides)


async def repeat_until(predicate: Any, action: Any, timeout: float = 30.0) -> None:
    """Run ``action()`` until ``predicate`` holds (bounded): traffic that clears a condition."""
    with anyio.fail_after(timeout):
        while not predicate():
            await action()
            await anyio.sleep(0.02)


async def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    """Poll ``predicate`` until true, failing after a generous bound (never a timing claim)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)
