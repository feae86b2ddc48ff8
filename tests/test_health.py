"""``/healthz`` says the process answers; ``/readyz`` whether it should get traffic, with the
reason in the body: lifecycle, configuration, stores (or their failure policy), ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.metering.ledger.postgres import PostgresLedger
from tenantware.testing.upstream import FakeUpstream
from tests.servers import find_free_port
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio


def gateway_with(**overrides: Any) -> Gateway:
    gateway, _ = in_process_gateway(config=make_config(**overrides))
    return gateway


async def test_healthz_answers_without_a_key_in_every_phase() -> None:
    gateway = gateway_with()
    app = gateway.asgi_app()
    async with client_for(app) as client:
        before = await client.get("/healthz")
        async with gateway.running():
            during = await client.get("/healthz")
        after = await client.get("/healthz")
    for response in (before, during, after):
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


async def test_readyz_follows_the_lifecycle_and_names_every_part() -> None:
    gateway = gateway_with()
    app = gateway.asgi_app()
    async with client_for(app) as client:
        starting = await client.get("/readyz")
        async with gateway.running():
            ready = await client.get("/readyz")
        draining = await client.get("/readyz")

    assert starting.status_code == 503
    assert starting.json()["reasons"] == ["gateway: starting"]

    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert "reasons" not in body
    assert body["gateway"]["status"] == "serving"
    assert body["config"]["status"] == "loaded"
    assert body["config"]["version"] == gateway.live.current.version
    assert body["stores"] == {"status": "ok", "shared": False}
    assert body["ledger"]["status"] == "ok"
    assert body["registry"]["status"] == "ok"

    assert draining.status_code == 503
    assert draining.json()["status"] == "not_ready"
    assert draining.json()["reasons"] == ["gateway: draining"]


async def test_readyz_reaches_a_shared_redis(redis_url: str, redis_prefix: str) -> None:
    gateway = gateway_with(gateway={"redis_url": redis_url, "redis_prefix": redis_prefix})
    async with gateway.running(), client_for(gateway.asgi_app()) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["stores"] == {"status": "ok", "shared": True}


@pytest.mark.parametrize(
    ("policy", "status", "ready"),
    [
        (None, "unreachable_policies_in_force", True),
        ("local", "unreachable_policies_in_force", True),
        ("closed", "unreachable", False),
    ],
)
async def test_an_unreachable_store_is_ready_only_while_a_policy_can_serve(
    policy: str | None, status: str, ready: bool
) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{find_free_port()}/0"
    settings: dict[str, Any] = {"redis_url": url, "redis_timeout_s": 0.2}
    if policy is not None:
        settings["on_store_failure"] = policy
    gateway = gateway_with(gateway=settings)
    async with gateway.running(), client_for(gateway.asgi_app()) as client:
        response = await client.get("/readyz")
    assert response.status_code == (200 if ready else 503)
    stores = response.json()["stores"]
    assert stores["status"] == status
    expected = policy or "local"
    assert stores["policies"]["requests"] == expected
    assert stores["policies"]["budget"] == (policy or "closed")
    assert "hunter2" not in response.text
    assert "redis://" not in response.text
    if not ready:
        assert response.json()["reasons"] == ["stores: unreachable"]


def _stuck_gateway(spill_path: Path) -> Gateway:
    dead = f"postgresql://tw:secret-password@127.0.0.1:{find_free_port()}/none"
    config = make_config(metering={"spill_path": str(spill_path), "request_log": False})
    gateway = Gateway(
        config,
        upstream_client=HttpxUpstreamClient(transport=httpx.ASGITransport(app=FakeUpstream())),
        ledger=PostgresLedger(dead, timeout_s=0.2),
    )
    assert gateway.writer is not None
    gateway.writer.stuck_after_s = 0.0  # no waiting in a test: stuck at the first failure
    return gateway


@pytest.mark.parametrize("spill_ok", [True, False], ids=["spilling", "nowhere-to-spill"])
async def test_a_stuck_ledger_is_ready_while_its_spill_file_takes_the_records(
    tmp_path: Path, spill_ok: bool
) -> None:
    if spill_ok:
        spill = tmp_path / "spill.jsonl"
    else:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        spill = blocker / "spill.jsonl"
    gateway = _stuck_gateway(spill)
    writer = gateway.writer
    assert writer is not None
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, KEYS["acme"]) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await writer.flush()
        ready = await client.get("/readyz", headers={"authorization": ""})
        writer.spill = None  # leaving running() would spill into the blocked path
    body = ready.json()
    assert body["ledger"]["stuck"] is True
    assert body["ledger"]["ledger"] == "postgres"
    assert "secret-password" not in ready.text
    if spill_ok:
        assert ready.status_code == 200
        assert body["ledger"]["status"] == "spilling"
    else:
        assert ready.status_code == 503
        assert body["ledger"]["status"] == "stuck"
        assert body["reasons"] == ["ledger: stuck"]
