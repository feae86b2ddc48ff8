"""Reports per tenant and period, the admin and tenant usage endpoints, CSV, the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tenantware import Gateway, KeyHasher
from tenantware.cli import main
from tenantware.context import Outcome
from tenantware.metering.ledger import MemoryLedger, SqliteLedger, UsageRecord
from tenantware.metering.reports import parse_time, summarize
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio

DAY = datetime(2026, 11, 3, tzinfo=UTC).timestamp()
ADMIN_KEY = "sk-admin-reports"


def rec(i: int, tenant: str, ts: float, outcome: str = "ok", latency: float = 0.1) -> UsageRecord:
    billed = outcome == "ok"
    return UsageRecord(
        record_id=f"{tenant}-{i}-{ts}",
        request_id=f"r{i}",
        ts=ts,
        tenant=tenant,
        outcome=outcome,
        status=200 if billed else 429,
        input_tokens=100 if billed else 0,
        output_tokens=10 if billed else 0,
        cost_nanousd=280_000 if billed else 0,
        charged_nanousd=308_000 if billed else 0,
        latency_s=latency,
    )


def test_summary_per_tenant_and_period() -> None:
    records = [rec(i, "acme", DAY + 60 * i, latency=(i + 1) / 100) for i in range(100)]
    records += [rec(100, "acme", DAY + 10, Outcome.UPSTREAM_ERROR, latency=9.0)]
    records += [rec(101, "acme", DAY + 20, Outcome.REJECTED_QUOTA, latency=0.001)]
    records += [rec(102, "acme", DAY + 30, Outcome.REJECTED_QUEUE, latency=0.001)]
    records += [rec(103, "hobby", DAY + 86_400 + 5)]
    rows = summarize(records, period="day", currency="EUR", currency_per_usd=Decimal("0.9"))
    acme, hobby = rows
    assert (acme.tenant, acme.period, hobby.period) == (
        "acme",
        "2026-11-03T00:00:00Z",
        "2026-11-04T00:00:00Z",
    )
    assert acme.requests == 103
    assert (acme.input_tokens, acme.output_tokens) == (10_000, 1_000)
    assert acme.cost_nanousd == 28_000_000
    assert acme.cost_usd == "0.028"
    assert (acme.charged, acme.currency) == ("0.027720", "EUR")
    assert acme.errors == 1
    assert acme.error_rate == pytest.approx(1 / 103)
    assert (acme.rate_limited, acme.queue_rejections) == (1, 1)
    assert acme.latency_p50_s == 0.51  # nearest rank of 101; rejections are not counted
    assert acme.latency_p99_s == 1.0
    hourly = summarize(records, period="hour")
    assert [r.period for r in hourly if r.tenant == "acme"][:2] == [
        "2026-11-03T00:00:00Z",
        "2026-11-03T01:00:00Z",
    ]
    monthly = summarize(records, period="month")
    assert [(r.tenant, r.period, r.requests) for r in monthly] == [
        ("acme", "2026-11-01T00:00:00Z", 103),
        ("hobby", "2026-11-01T00:00:00Z", 1),
    ]


def test_parse_time_forms() -> None:
    assert parse_time("2026-11-03") == DAY
    assert parse_time("2026-11-03T00:00:00Z") == DAY
    assert parse_time(str(DAY)) == DAY
    assert parse_time("2h", now=DAY) == DAY - 7200
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time("yesterday-ish")


def _admin_gateway() -> tuple[Gateway, MemoryLedger]:
    config = make_config(
        metering={
            "ledger_url": "memory://",
            "request_log": False,
            "admin_key_hash": KeyHasher().hash(ADMIN_KEY),
        }
    )
    gateway, _ = in_process_gateway(config=config)
    assert isinstance(gateway.ledger, MemoryLedger)
    return gateway, gateway.ledger


async def test_admin_sees_every_tenant_and_a_tenant_only_itself() -> None:
    gateway, _ = _admin_gateway()
    app = gateway.asgi_app()
    async with client_for(app, KEYS["acme"]) as acme, client_for(app, KEYS["hobby"]) as hobby:
        await acme.post("/v1/chat/completions", json=CHAT)
        await acme.post("/v1/chat/completions", json=CHAT)
        await hobby.post("/v1/chat/completions", json={**CHAT, "model": "gemini-2.5-flash"})
        assert gateway.writer is not None
        await gateway.writer.flush()
        admin_headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        everyone = await acme.get("/admin/usage?since=1h", headers=admin_headers)
        assert everyone.status_code == 200
        rows = {row["tenant"]: row for row in everyone.json()["data"]}
        assert (rows["acme"]["requests"], rows["hobby"]["requests"]) == (2, 1)
        one = await acme.get("/admin/usage?tenant=hobby&format=csv", headers=admin_headers)
        assert one.text.splitlines()[1].startswith("hobby,")

        own = await acme.get("/v1/usage?since=1h&period=hour")
        assert own.status_code == 200
        assert [row["tenant"] for row in own.json()["data"]] == ["acme"]
        own_records = await hobby.get("/v1/usage?format=records")
        lines = own_records.text.splitlines()
        assert len(lines) == 2
        assert lines[1].split(",")[3] == "hobby"
        assert KEYS["hobby"] not in own_records.text

        # Every way a tenant key could reach another tenant's usage is closed.
        for path in (
            "/v1/usage?tenant=hobby",
            "/v1/usage?tenant=hobby&format=csv",
            "/v1/usage?tenant=hobby&format=records",
        ):
            refused = await acme.get(path)
            assert refused.status_code == 403, path
            assert refused.json()["error"]["code"] == "permission_denied"
        for path in (
            "/admin/usage",
            "/admin/usage?tenant=hobby",
            "/admin/usage?format=records",
            "/metrics",
        ):
            refused = await acme.get(path)
            assert refused.status_code == 401, path
            assert "hobby" not in refused.text
        anonymous = await acme.get("/v1/usage", headers={"authorization": ""})
        assert anonymous.status_code == 401
        bad = await acme.get("/v1/usage?period=week")
        assert bad.status_code == 400


async def test_admin_endpoints_are_closed_without_an_admin_key() -> None:
    gateway, _ = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.get("/admin/usage")).status_code == 401


def test_cli_usage_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import anyio

    path = tmp_path / "ledger.db"

    async def fill() -> None:
        ledger = SqliteLedger(path)
        await ledger.write([rec(i, "acme", DAY + i) for i in range(3)] + [rec(9, "hobby", DAY)])
        await ledger.aclose()

    anyio.run(fill)
    url = f"sqlite:///{path}"
    assert main(["usage", "--ledger", url, "--tenant", "acme", "--since", "2026-11-01"]) == 0
    table = capsys.readouterr().out
    assert "acme" in table
    assert "hobby" not in table
    args = ["usage", "--ledger", url, "--since", "2026-11-01", "--until", "2026-11-05"]
    assert main([*args, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["tenant"], r["requests"]) for r in rows} == {("acme", 3), ("hobby", 1)}
    assert main([*args, "--format", "records"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["usage", "--ledger", url, "--since", "someday"]) == 2


def test_cli_usage_names_the_ledger_it_read_and_warns_when_it_is_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["usage", "--ledger", "sqlite:///elsewhere.db", "--tenant", "acme"]) == 0
    captured = capsys.readouterr()
    # A relative SQLite path is shown absolute: the reader sees which directory it meant.
    assert f"ledger sqlite:///{tmp_path / 'elsewhere.db'}" in captured.err
    assert "warning: no usage records in this ledger for tenant acme" in captured.err
    assert "acme" not in captured.out  # the table has its header only


def test_cli_usage_reads_the_ledger_url_of_the_config_with_its_password_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    path = tmp_path / "ledger.db"

    async def fill() -> None:
        ledger = SqliteLedger(path)
        await ledger.write([rec(1, "acme", DAY)])
        await ledger.aclose()

    anyio.run(fill)
    monkeypatch.setenv("TW_TEST_LEDGER_DIR", str(tmp_path))
    config = tmp_path / "gateway.toml"
    config.write_text('[metering]\nledger_url = "sqlite:///${TW_TEST_LEDGER_DIR}/ledger.db"\n')
    assert main(["usage", "--config", str(config), "--since", "2026-11-01"]) == 0
    captured = capsys.readouterr()
    assert f"ledger sqlite:///{path}" in captured.err
    assert "warning" not in captured.err
    assert "acme" in captured.out
    monkeypatch.delenv("TW_TEST_LEDGER_DIR")
    assert main(["usage", "--config", str(config)]) == 2
    assert "metering.ledger_url: environment variable TW_TEST_LEDGER_DIR is not set" in (
        capsys.readouterr().err
    )


def test_cli_usage_never_shows_a_ledger_password(
    capsys: pytest.CaptureFixture[str], postgres_url: str, postgres_schema: str
) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(postgres_url)
    with_password = (
        parts._replace(
            netloc=f"{parts.username or 'postgres'}:s3cret-pw@{parts.hostname}:{parts.port or 5432}"
        )
        ._replace(query=f"schema={postgres_schema}")
        .geturl()
    )
    # trust auth: the password is accepted and ignored, the report runs.
    assert main(["usage", "--ledger", with_password, "--since", "1h"]) == 0
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.err + captured.out
    assert ":***@" in captured.err


def _own_starlette_app(gateway: Gateway, *, wrap: bool) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    routes: list[Any] = [Route("/", home), Mount("/v1", app=gateway.proxy)]
    if wrap:
        return gateway.wrap(Starlette(routes=routes))
    return Starlette(routes=routes, middleware=gateway.middleware())


@pytest.mark.parametrize("wrap", [True, False], ids=["wrap", "middleware"])
async def test_the_admin_usage_and_metrics_routes_serve_a_users_own_app(wrap: bool) -> None:
    gateway, ledger = _admin_gateway()
    app = _own_starlette_app(gateway, wrap=wrap)
    admin_headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    # Within the gateway's lifespan, as the app's server runs it (/readyz: not before).
    async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
        assert (await acme.get("/", headers={"authorization": ""})).text == "home"
        assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert gateway.writer is not None
        await gateway.writer.flush()
        own = await acme.get("/v1/usage?since=1h")
        assert own.status_code == 200, own.text
        assert [row["tenant"] for row in own.json()["data"]] == ["acme"]
        everyone = await acme.get("/admin/usage?since=1h", headers=admin_headers)
        assert [row["requests"] for row in everyone.json()["data"]] == [1]
        metrics = await acme.get("/metrics", headers=admin_headers)
        assert metrics.status_code == 200
        assert 'tenantware_requests_total{model="gpt-4.1",outcome="ok",tenant="acme"}' in (
            metrics.text
        )
        assert (await acme.get("/metrics")).status_code == 401  # a tenant key
        tenants = await acme.get("/admin/tenants", headers=admin_headers)
        assert {t["id"] for t in tenants.json()["data"]} >= {"acme", "hobby"}
        assert (await acme.get("/readyz")).json()["status"] == "ready"
    # The usage requests themselves are not metered: one record, the completion's.
    assert [record.model_requested for record in await ledger.query()] == ["gpt-4.1"]
