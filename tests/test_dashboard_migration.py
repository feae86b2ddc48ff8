"""The dashboard's shadow/canary comparison (``GET /admin/dashboard/migration``) without a
browser: who may read it, that its figures are the comparison report's and the ledger's,
the states of the candidates, and the series."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tenantware.metering.ledger import UsageRecord
from tests.metering_support import records_of, wait_for
from tests.support import CHAT, KEYS, client_for, in_process_gateway
from tests.test_admin_api import READER, admin_config

pytestmark = pytest.mark.anyio

RULES = [
    {
        "name": "gpt-shadow",
        "model": "gpt-4.1",
        "primary": "fake",
        "candidates": [
            {"upstream": "relay", "shadow_percent": 100},
            {"upstream": "relay-old"},  # both shares 0: off
        ],
    },
    {
        "name": "gemini-canary",
        "model": "gemini-2.5-flash",
        "rollback_minimum_calls": 1,
        "candidates": [{"upstream": "relay", "canary_percent": 100}],
    },
]


def migration_config(rules: list[dict[str, Any]] = RULES) -> Any:
    return admin_config(
        upstreams=[
            {
                "name": "fake",
                "base_url": "http://upstream.test/v1",
                "models": ["gpt-4.1", "gemini-2.5-flash"],
                "timeout_s": 5,
            },
            {"name": "relay", "base_url": "http://relay.test/v1", "timeout_s": 5},
            {"name": "relay-old", "base_url": "http://relay.test/v1", "timeout_s": 5},
        ],
        migration={"rules": rules},
    )


def _trial(view: dict[str, Any], key: str) -> dict[str, Any]:
    (found,) = [t for t in view["trials"] if t["trial"] == key]
    return found


async def test_only_operators_read_the_trials() -> None:
    gateway, _ = in_process_gateway(config=migration_config())
    app = gateway.asgi_app()
    async with (
        client_for(app) as anyone,
        client_for(app, KEYS["acme"]) as tenant,
        client_for(app, READER) as reader,
    ):
        assert (await anyone.get("/admin/dashboard/migration")).status_code == 401
        refused = await tenant.get("/admin/dashboard/migration")
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "permission_denied"
        assert "gpt-shadow" not in refused.text
        assert "content-security-policy" in refused.headers
        view = (await reader.get("/admin/dashboard/migration?range=1h")).json()
        assert view["object"] == "dashboard.migration"
        assert view["period"] == "minute"
        assert [t["trial"] for t in view["trials"]] == [
            "gpt-shadow/relay/gpt-4.1",
            "gpt-shadow/relay-old/gpt-4.1",
            "gemini-canary/relay/gemini-2.5-flash",
        ]
        assert [t["state"] for t in view["trials"]] == ["active", "off", "active"]
        assert view["series"] == []
        assert view["oldest_kept"] is None
        for query, param in (("range=2y", "range"), ("since=yesterday", "since")):
            bad = await reader.get(f"/admin/dashboard/migration?{query}")
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == param
        for method in ("POST", "PUT", "DELETE"):
            answer = await reader.request(method, "/admin/dashboard/migration")
            assert answer.status_code == 405
        document = (await anyone.get("/admin/openapi.json")).json()
        assert "/admin/dashboard/migration" in document["paths"]
        assert "MigrationView" in document["components"]["schemas"]


async def test_figures_are_the_reports_and_the_ledgers() -> None:
    gateway, fake = in_process_gateway(config=migration_config())
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, KEYS["acme"]) as acme,
        client_for(app, KEYS["hobby"]) as hobby,
        client_for(app, READER) as reader,
    ):
        for body in [CHAT, {**CHAT, "stream": True}] * 3:
            assert (await acme.post("/v1/chat/completions", json=body)).status_code == 200
        gemini = {**CHAT, "model": "gemini-2.5-flash"}
        for _ in range(4):
            answer = await hobby.post("/v1/chat/completions", json=gemini)
            assert answer.status_code == 200
            assert answer.headers["x-tenantware-upstream"] == "relay"
        await wait_for(lambda: gateway.migration.in_flight == 0, timeout=30)
        await wait_for(
            lambda: sum(r.shadow_requests for r in gateway.migration.book.report()) == 6,
            timeout=30,
        )
        records: list[UsageRecord] = await records_of(gateway)
        view = (await reader.get("/admin/dashboard/migration?range=24h")).json()
        report = (await reader.get("/admin/migration/report")).json()
    shadow = _trial(view, "gpt-shadow/relay/gpt-4.1")
    canary = _trial(view, "gemini-canary/relay/gemini-2.5-flash")
    # The figures are the comparison report's rows, as they are.
    by_trial = {row["trial"]: row for row in report["data"]}
    assert shadow["figures"] == by_trial[shadow["trial"]]
    assert canary["figures"] == by_trial[canary["trial"]]
    assert _trial(view, "gpt-shadow/relay-old/gpt-4.1")["figures"]["shadow_requests"] == 0
    # ... and the ledger's: one record per shadow call, its cost the candidate's.
    shadows = [r for r in records if r.outcome == "shadow"]
    assert shadow["figures"]["shadow_requests"] == len(shadows) == 6
    assert shadow["figures"]["shadow_cost_nanousd"] == sum(r.cost_nanousd for r in shadows) > 0
    primaries = [r for r in records if r.model_requested == "gpt-4.1" and r.outcome == "ok"]
    assert shadow["figures"]["primary_cost_nanousd"] == sum(r.cost_nanousd for r in primaries)
    served = [r for r in records if r.outcome == "ok" and r.upstream == "relay"]
    assert canary["figures"]["canary_requests"] == len(served) == 4
    assert (shadow["primary"], shadow["upstream"], shadow["candidate_model"]) == (
        "fake",
        "relay",
        "gpt-4.1",
    )
    assert (shadow["shadow_percent"], canary["canary_percent"]) == (100.0, 100.0)
    # The series sums to the figures; every point is in the range.
    points = [p for p in view["series"] if p["trial"] == shadow["trial"]]
    assert sum(p["shadow_requests"] for p in points) == 6
    assert sum(p["canary_requests"] for p in points) == 0
    assert all(p["latency_p99_s"] is not None for p in points)
    assert all(p["primary_latency_p99_s"] is not None for p in points)
    canary_points = [p for p in view["series"] if p["trial"] == canary["trial"]]
    assert sum(p["canary_requests"] for p in canary_points) == 4
    assert all(p["primary_latency_p99_s"] is None for p in canary_points)
    assert view["oldest_kept"] <= min(r.ts for r in shadows) + 1
    assert fake.stats.requests == 6 + 6 + 4


async def test_rolled_back_and_removed_trials_are_shown_so() -> None:
    gateway, _ = in_process_gateway(config=migration_config())
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, KEYS["hobby"]) as hobby,
        client_for(app, READER) as reader,
    ):
        gemini = {**CHAT, "model": "gemini-2.5-flash"}
        assert (await hobby.post("/v1/chat/completions", json=gemini)).status_code == 200
        # The candidate fails where the primary does not: rolled back by the runner's rule.
        runner = gateway.migration
        trial = runner.table(gateway.live.current).trials["gemini-canary/relay/gemini-2.5-flash"]
        window_s = gateway.live.current.config.breaker.deployment.window_s
        runner.rollbacks.record_primary(trial.rule, True, 0.1, window_s)
        assert runner.rollbacks.record_candidate(trial, False, 0.1, window_s) is not None
        view = (await reader.get("/admin/dashboard/migration")).json()
        rolled = _trial(view, trial.key)
        assert rolled["state"] == "rolled_back"
        assert rolled["figures"]["rolled_back"] is True
        # The rule is gone from the configuration: its comparisons are still shown.
        gateway.live.replace(migration_config(RULES[:1]))
        view = (await reader.get("/admin/dashboard/migration")).json()
        removed = _trial(view, trial.key)
        assert removed["state"] == "removed"
        assert (removed["rule"], removed["model"], removed["upstream"]) == (
            "gemini-canary",
            None,
            "relay",
        )
        assert removed["figures"]["canary_requests"] == 1
        assert msgspec.json.decode(msgspec.json.encode(view))["trials"][0]["state"] == "active"
