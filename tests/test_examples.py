"""Each example runs: its own routes, the tenant context, and the proxy under /v1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.testclient import TestClient

from tenantware import Gateway
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream
from tests.support import CHAT, KEYS, make_config


def _starlette(gateway: Gateway) -> Any:
    from examples.starlette_app.app import create_app

    return create_app(gateway)


def _fastapi(gateway: Gateway) -> Any:
    from examples.fastapi_app.app import create_app

    return create_app(gateway)


@pytest.mark.parametrize("factory", [_starlette, _fastapi], ids=["starlette", "fastapi"])
def test_example_serves_own_routes_tenant_context_and_proxy(
    factory: Callable[[Gateway], Any],
) -> None:
    with serve_in_thread(FakeUpstream()) as upstream:
        app = factory(Gateway(make_config(upstream + "/v1")))
        with TestClient(app) as client:
            home = client.get("/")
            assert home.status_code == 200
            whoami = client.get("/v1/whoami", headers={"authorization": f"Bearer {KEYS['acme']}"})
            assert whoami.json()["tenant"] == "acme"
            assert whoami.json()["request_id"] == whoami.headers["x-request-id"]
            denied = client.get("/v1/whoami")
            assert denied.status_code == 401
            completion = client.post(
                "/v1/chat/completions",
                json=CHAT,
                headers={"authorization": f"Bearer {KEYS['acme']}"},
            )
            assert completion.status_code == 200
            assert completion.json()["usage"]["total_tokens"] > 0
