"""The dashboard's JSON endpoints and page headers, without a browser: who may read what, the
range rules, the Content-Security-Policy, and that a read-only key changes nothing."""

from __future__ import annotations

import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.dashboard.app import pick_period
from tenantware.metering.ledger import LedgerUnavailable, MemoryLedger
from tenantware.metering.ledger.tally import ReportQuery, Tally
from tenantware.testing.upstream import FakeUpstream
from tests.support import CHAT, KEYS, client_for, in_process_gateway
from tests.test_admin_api import ADMIN, READER, admin_config

pytestmark = pytest.mark.anyio


async def test_page_and_assets_carry_a_strict_policy() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    async with client_for(gateway.asgi_app()) as anyone:
        page = await anyone.get("/dashboard")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script src=" in page.text
        assert "<script>" not in page.text  # no inline script
        script = await anyone.get("/dashboard/static/dashboard.js")
        assert script.headers["content-type"].startswith("text/javascript")
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in script.text
        chart = await anyone.get("/dashboard/static/vendor/uPlot.iife.min.js")
        assert chart.status_code == 200
        licence = await anyone.get("/dashboard/static/vendor/uPlot.LICENSE")
        assert "MIT" in licence.text
        assert (await anyone.get("/dashboard/static/../app.py")).status_code == 404
        assert (await anyone.get("/dashboard/static/nothing.js")).status_code == 404


async def test_who_may_read_what() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, KEYS["acme"]) as acme,
        client_for(app, KEYS["hobby"]) as hobby,
        client_for(app, READER) as reader,
        client_for(app) as anyone,
    ):
        for _ in range(3):
            assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await gateway.writer.flush()  # type: ignore[union-attr]
        assert (await anyone.get("/admin/dashboard/usage")).status_code == 401
        assert (await anyone.get("/admin/dashboard/live")).status_code == 401
        own = (await acme.get("/admin/dashboard/usage?range=1h")).json()
        assert own["scope"] == "tenant"
        assert own["tenant"] == "acme"
        assert [(r["tenant"], r["requests"]) for r in own["totals"]] == [("acme", 3)]
        assert own["period"] == "minute"
        # Another tenant's id, existing or not, is the same 404: nothing to learn.
        for other in ("hobby", "no-such-tenant"):
            refused = await acme.get(f"/admin/dashboard/usage?tenant={other}")
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "tenant_not_found"
        empty = (await hobby.get("/admin/dashboard/usage")).json()
        assert empty["totals"] == []
        assert empty["tenant"] == "hobby"
        assert (await acme.get("/admin/dashboard/live")).status_code == 403
        every = (await reader.get("/admin/dashboard/usage?range=7d")).json()
        assert every["scope"] == "operator"
        assert every["period"] == "hour"
        assert {r["tenant"] for r in every["totals"]} == {"acme"}
        live = (await reader.get("/admin/dashboard/live")).json()
        assert live["store"] == {"kind": "memory", "shared": False, "up": True}
        assert live["ledger"]["ledger"] == "memory"
        assert {c["model"] for c in live["circuits"]} >= {"gpt-4.1"}
        assert all(c["state"] == "closed" for c in live["circuits"])
        # Nothing here changes state, whatever the key.
        for client in (reader, acme):
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                answer = await client.request(method, "/admin/dashboard/usage")
                assert answer.status_code == 405


async def test_ranges() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    async with client_for(gateway.asgi_app(), ADMIN) as admin:
        custom = await admin.get(
            "/admin/dashboard/usage?since=2026-11-01T00:00:00Z&until=2026-11-03T00:00:00Z"
        )
        assert custom.status_code == 200
        body = custom.json()
        assert (body["until"] - body["since"], body["period"]) == (2 * 86400, "hour")
        for query, param in (
            ("range=2y", "range"),
            ("since=yesterday", "since"),
            ("since=2026-11-03&until=2026-11-01", "since"),
            ("since=2020-01-01&until=2026-01-01", "since"),
        ):
            bad = await admin.get(f"/admin/dashboard/usage?{query}")
            assert bad.status_code == 400, query
            assert bad.json()["error"]["param"] == param
        assert (await admin.get("/admin/dashboard/nothing")).status_code == 404


def test_series_never_has_too_many_points() -> None:
    assert pick_period(3600) == ("minute", 60)
    assert pick_period(86400) == ("hour", 3600)
    assert pick_period(30 * 86400) == ("hour", 3600)
    assert pick_period(90 * 86400) == ("day", 86400)
    # Every tenant's series together stay under 4,000 rows: a month of 20 tenants by day.
    assert pick_period(30 * 86400, series=20) == ("day", 86400)
    assert pick_period(7 * 86400, series=20) == ("hour", 3600)
    assert pick_period(30 * 86400, series=3) == ("hour", 3600)


class _Unreadable(MemoryLedger):
    async def tally(self, query: ReportQuery) -> list[Tally]:
        raise LedgerUnavailable("postgresql: connection refused")


async def test_an_unreadable_ledger_is_a_503_not_a_500() -> None:
    fake = FakeUpstream()
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    gateway = Gateway(admin_config(), upstream_client=client, ledger=_Unreadable())
    async with client_for(gateway.asgi_app(), READER) as reader:
        answer = await reader.get("/admin/dashboard/usage")
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "ledger_unavailable"
        assert "connection refused" not in answer.text
        assert answer.headers["retry-after"] == "1"
        assert "content-security-policy" in answer.headers
