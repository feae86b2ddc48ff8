"""Migration rules: sticky canary splits, invisible shadow traffic, the comparison report and
rollback, against two fake upstreams (the primary and the candidate)."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from tenantware import Gateway, parse_config
from tenantware.config import MigrationSettings
from tenantware.keys import KeyHasher
from tenantware.migration import RuleTable, agreement, answer_of
from tenantware.migration.rules import sticky_point
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.metering_support import records_of, wait_for
from tests.support import CHAT, KEYS, client_for, tenant_entries

ADMIN = "sk-test-migration-admin"

pytestmark = pytest.mark.anyio

STREAM = {**CHAT, "stream": True}

# -- the split, in process -----------------------------------------------------------------


def _table(canary: float, shadow: float = 0.0, **rule: Any) -> RuleTable:
    settings = msgspec.convert(
        {
            "rules": [
                {
                    "name": "trial",
                    "model": "gpt-4.1",
                    "candidates": [
                        {"upstream": "relay", "canary_percent": canary, "shadow_percent": shadow}
                    ],
                    **rule,
                }
            ]
        },
        MigrationSettings,
    )
    return RuleTable(settings)


def _never(_trial: Any) -> bool:
    return False


async def test_canary_share_is_within_a_binomial_bound_and_sticky() -> None:
    n, share = 10_000, 0.10
    table = _table(canary=10)
    served = Counter()
    for index in range(n):
        plan = table.plan("gpt-4.1", "acme", "enterprise", f"session-{index}", _never)
        assert plan is not None
        served[plan.canary is not None] += 1
    # 99.9 % two-sided: z = 3.2905.
    spread = 3.2905 * math.sqrt(n * share * (1 - share))
    assert abs(served[True] - n * share) <= spread, served
    # The same key lands on the same target, in this table and in another process's.
    other = _table(canary=10)
    for index in range(500):
        key = f"session-{index}"
        first = table.plan("gpt-4.1", "acme", "enterprise", key, _never)
        again = other.plan("gpt-4.1", "acme", "enterprise", key, _never)
        assert first is not None
        assert again is not None
        assert (first.canary is None) == (again.canary is None)
    # Without a session, the tenant is the key.
    by_tenant = {
        table.plan("gpt-4.1", "acme", "enterprise", None, _never) is not None
        and table.plan("gpt-4.1", "acme", "enterprise", None, _never).canary is not None  # type: ignore[union-attr]
        for _ in range(20)
    }
    assert len(by_tenant) == 1
    # Raising the share only moves keys from the primary to the candidate.
    wider = _table(canary=30)
    for index in range(2_000):
        key = f"session-{index}"
        if sticky_point("trial", key) < 1_000:
            plan = wider.plan("gpt-4.1", "acme", "enterprise", key, _never)
            assert plan is not None
            assert plan.canary is not None


async def test_rules_apply_to_their_tenants_and_tiers_only() -> None:
    table = _table(canary=100, shadow=100, tenants=["acme"], exclude_tenants=["hobby"])
    assert table.plan("gpt-4.1", "hobby", "free", None, _never) is None
    assert table.plan("gpt-4.4", "acme", "enterprise", None, _never) is None
    plan = table.plan("gpt-4.1", "acme", "enterprise", None, _never)
    assert plan is not None
    assert plan.canary is not None
    assert plan.shadows == ()  # the canary's own candidate gets no copy of what it serves
    tiered = _table(canary=0, shadow=100, tiers=["enterprise"])
    assert tiered.plan("gpt-4.1", "hobby", "free", None, _never) is None
    shadowed = tiered.plan("gpt-4.1", "acme", "enterprise", None, _never)
    assert shadowed is not None
    assert len(shadowed.shadows) == 1


async def test_tenants_with_a_data_residency_flag_stay_out_unless_the_rule_allows_it() -> None:
    table = _table(canary=100, shadow=100)
    assert table.plan("gpt-4.1", "acme", "enterprise", None, _never, residency="eu") is None
    assert table.plan("gpt-4.1", "acme", "enterprise", None, _never) is not None
    allowing = _table(canary=0, shadow=100, allow_residency=["eu"])
    plan = allowing.plan("gpt-4.1", "acme", "enterprise", None, _never, residency="eu")
    assert plan is not None
    assert len(plan.shadows) == 1
    assert allowing.plan("gpt-4.1", "acme", "enterprise", None, _never, residency="us") is None


async def test_rollback_judges_the_candidate_against_the_primary_over_the_window() -> None:
    from tenantware.migration import Rollbacks

    now = [0.0]
    table = _table(canary=10, rollback_p99_margin_percent=50.0, rollback_minimum_calls=10)
    (trial,) = table.trials.values()
    rule = trial.rule
    rollbacks = Rollbacks(clock=lambda: now[0])
    for _ in range(20):
        rollbacks.record_primary(rule, True, 0.100, 10.0)
    # As fast and as healthy: kept, even with a few errors within the margin.
    for index in range(20):
        assert rollbacks.record_candidate(trial, index != 0, 0.120, 10.0) is None
    assert not rollbacks.rolled_back(trial)
    # The window moves on: old calls no longer count, slow ones now do.
    now[0] = 30.0
    for _ in range(20):
        rollbacks.record_primary(rule, True, 0.100, 10.0)
    reasons = [rollbacks.record_candidate(trial, True, 0.400, 10.0) for _ in range(10)]
    assert reasons[:9] == [None] * 9
    assert reasons[9] is not None
    assert reasons[9].startswith("p99 400 ms")
    assert rollbacks.rolled_back(trial)
    assert rollbacks.count == 1
    # Another setting for the candidate (a reload, an API call) re-arms it.
    (again,) = _table(canary=5, rollback_p99_margin_percent=50.0).trials.values()
    assert not rollbacks.rolled_back(again)


async def test_agreement_reads_text_and_tools_of_every_format() -> None:
    chat = b'{"choices":[{"message":{"content":"a b c","tool_calls":[{"function":{"name":"f"}}]}}]}'
    stream = (
        b'data: {"choices":[{"delta":{"content":"a b"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":" c",'
        b'"tool_calls":[{"function":{"name":"f"}}]}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert answer_of(chat, stream=False) == answer_of(stream, stream=True)
    assert agreement(answer_of(chat, stream=False), answer_of(stream, stream=True)) == (
        True,
        1.0,
        True,
    )
    other = answer_of(b'{"choices":[{"message":{"content":"a b d"}}]}', stream=False)
    exact, similarity, tools = agreement(answer_of(chat, stream=False), other)
    assert (exact, similarity, tools) == (False, 0.5, False)


# -- through the gateway ---------------------------------------------------------------------


@pytest.fixture
def fakes() -> Iterator[tuple[FakeUpstream, str, FakeUpstream, str]]:
    primary = FakeUpstream(FakeUpstreamConfig())
    candidate = FakeUpstream(FakeUpstreamConfig())
    with (
        serve_in_thread(primary, startup_timeout_s=30) as primary_url,
        serve_in_thread(candidate, startup_timeout_s=30) as candidate_url,
    ):
        yield primary, primary_url, candidate, candidate_url


def _config(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
    *,
    canary: float = 0,
    shadow: float = 0,
    **migration: Any,
) -> Any:
    _p, primary_url, _c, candidate_url = fakes
    rule = {
        "name": "trial",
        "model": "gpt-4.1",
        "candidates": [{"upstream": "relay", "canary_percent": canary, "shadow_percent": shadow}],
        "rollback_minimum_calls": 5,
    }
    rule.update(migration.pop("rule", {}))
    return parse_config(
        {
            "tenants": tenant_entries(),
            "upstreams": [
                {"name": "main", "base_url": primary_url + "/v1", "models": ["gpt-4.1"]},
                # Not listed for the model: it gets only what the rule sends it.
                {"name": "relay", "base_url": candidate_url + "/v1", "timeout_s": 5},
            ],
            "gateway": {"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}]},
            "breaker": {"max_attempts": 2, "retry_base_s": 0.001},
            "metering": {"ledger_url": "memory://", "request_log": False},
            "migration": {"rules": [rule], **migration},
        }
    )


@asynccontextmanager
async def _running(config: Any) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    gateway = Gateway(config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        yield gateway, client


async def test_canary_is_served_by_the_candidate_and_says_so(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    primary, _, candidate, _ = fakes
    async with _running(_config(fakes, canary=50)) as (_gateway, client):
        seen: dict[str, set[str]] = {}
        for index in range(40):
            session = f"conversation-{index % 8}"
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-session-id": session}
            )
            assert response.status_code == 200
            assert response.headers["x-tenantware-model"] == "gpt-4.1"
            seen.setdefault(session, set()).add(response.headers["x-tenantware-upstream"])
    assert all(len(targets) == 1 for targets in seen.values()), seen
    served = Counter(next(iter(t)) for t in seen.values())
    assert set(served) == {"main", "relay"}
    assert candidate.stats.requests == 5 * served["relay"]
    assert primary.stats.requests == 5 * served["main"]


def _normal(response: httpx.Response) -> tuple[int, Any]:
    """Status and body without the fields that differ between any two answers (ids, time)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.split("\n") if line.startswith("data: {")]
        parsed = [msgspec.json.decode(line[6:]) for line in events]
        for event in parsed:
            event.pop("id", None)
            event.pop("created", None)
        return response.status_code, parsed
    body = response.json()
    if isinstance(body, dict):
        body.pop("id", None)
        body.pop("created", None)
    return response.status_code, body


async def _traffic(
    gateway: Gateway, client: httpx.AsyncClient, primary: FakeUpstream
) -> tuple[list[tuple[int, Any]], list[tuple[str, int, int, int]]]:
    """Six requests (JSON, stream, an upstream 400): what the client saw and was billed."""
    primary.config.fail_next = [200, 200, 200, 200, 400]
    seen = []
    for index, body in enumerate([CHAT, STREAM, CHAT, STREAM, {**CHAT, "max_tokens": 2}, CHAT]):
        response = await client.post(
            "/v1/chat/completions", json=body, headers={"x-request-id": f"r{index}"}
        )
        seen.append(_normal(response))
    records = await records_of(gateway)
    bills = sorted(
        (r.request_id, r.status, r.output_tokens, r.charged_nanousd)
        for r in records
        if r.outcome != "shadow"
    )
    return seen, bills


@pytest.mark.parametrize("behaviour", ["failing", "hanging", "slow"])
async def test_shadow_is_invisible_to_clients_and_their_bills(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str], behaviour: str
) -> None:
    primary, _, candidate, _ = fakes
    async with _running(_config(fakes)) as (gateway, client):
        baseline = await _traffic(gateway, client, primary)
    primary.reset()
    if behaviour == "failing":
        candidate.config.failure_rate = 1.0
    elif behaviour == "hanging":
        candidate.config.latency_s = 60.0
    else:
        candidate.config.latency_s = 0.2
    # The hanging candidate meets the shadow's time limit; the slow one stays well inside it.
    timeout = 1.0 if behaviour == "hanging" else 20.0
    config = _config(
        fakes, shadow=100, shadow_timeout_s=timeout, rule={"rollback_error_margin_percent": None}
    )
    async with _running(config) as (gateway, client):
        shadowed = await _traffic(gateway, client, primary)
        await wait_for(lambda: gateway.migration.in_flight == 0, timeout=30)
        records = await records_of(gateway)
    assert shadowed == baseline
    assert [status for status, _body in shadowed[0]] == [200, 200, 200, 200, 400, 200]
    shadows = [r for r in records if r.outcome == "shadow"]
    assert len(shadows) == 6
    assert {r.upstream for r in shadows} == {"relay"}
    assert all(r.charged_nanousd == 0 for r in shadows)
    if behaviour == "slow":
        assert all(r.status == 200 and r.cost_nanousd > 0 for r in shadows)
    else:
        assert all(r.cost_nanousd == 0 and r.output_tokens == 0 for r in shadows)
    (row,) = gateway.migration.book.report()
    expected_error = {"failing": 1.0, "hanging": 1.0, "slow": 0.0}[behaviour]
    assert row.shadow_requests == 6
    assert row.shadow_error_rate == expected_error


async def test_report_figures_equal_what_the_fakes_counted(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    primary, _, candidate, _ = fakes
    candidate.config.stream_chunks = 7  # a different answer: longer
    async with _running(_config(fakes, shadow=100)) as (gateway, client):
        for body in [CHAT, STREAM] * 5:
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        await wait_for(lambda: gateway.migration.in_flight == 0, timeout=30)
        records = await records_of(gateway)
        rows = gateway.migration.book.report()
        admin = {"authorization": f"Bearer {ADMIN}"}
        api = await client.get("/admin/migration/report", headers=admin)
        csv_answer = await client.get("/admin/migration/report?format=csv", headers=admin)
        refused = await client.get("/admin/migration/report")  # a tenant key
    assert refused.status_code == 403
    assert api.status_code == 200
    assert api.json()["data"] == [msgspec.to_builtins(r) for r in rows]
    # What it covers: this process, from its oldest comparison kept.
    assert api.json()["process"].endswith(f":{os.getpid()}")
    assert api.json()["oldest_kept"] == min(e.ts for e in gateway.migration.book.entries)
    lines = csv_answer.text.splitlines()
    assert lines[0].startswith("rule,trial,shadow_requests,")
    assert lines[1].startswith("trial,trial/relay/gpt-4.1,10,")
    (row,) = rows
    assert row.shadow_requests == candidate.stats.requests == 10
    # Streams are shadowed as streams.
    assert sum(r.stream for r in candidate.stats.by_request_id.values()) == 5
    assert row.shadow_tokens_per_request == (
        (candidate.stats.prompt_tokens + candidate.stats.completion_tokens) / 10
    )
    assert row.primary_tokens_per_request == (
        (primary.stats.prompt_tokens + primary.stats.completion_tokens) / 10
    )
    shadow_cost = sum(r.cost_nanousd for r in records if r.outcome == "shadow")
    assert row.shadow_cost_nanousd == shadow_cost > 0
    primary_cost = sum(r.cost_nanousd for r in records if r.outcome != "shadow")
    assert row.primary_cost_nanousd == primary_cost
    assert row.exact_match_rate == 0.0
    assert row.similarity_mean == 1.0  # the same words, more of them
    assert row.same_tools_rate == 1.0
    assert row.shadow_error_rate == row.primary_error_rate == 0.0
    assert row.shadow_ttft_p50_s is not None
    assert row.primary_ttft_p50_s is not None


async def test_a_failing_canary_rolls_back_without_failing_a_client(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    primary, _, candidate, _ = fakes
    candidate.config.failure_rate = 1.0
    config = _config(fakes, canary=50)
    async with _running(config) as (gateway, client):
        for index in range(60):
            response = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-session-id": f"s{index}"}
            )
            assert response.status_code == 200  # a failed canary call moves on to the primary
            assert response.headers["x-tenantware-upstream"] == "main"
        assert gateway.migration.report_rolled_back() == ["trial/relay/gpt-4.1"]
        tried = candidate.stats.requests
        assert 5 <= tried < 60
        for index in range(20):
            await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-session-id": f"s{index}"}
            )
        assert candidate.stats.requests == tried  # rolled back: no more canary calls
        # A reload with other settings re-arms it; a share of 0 is the rollback by hand.
        gateway.live.replace(_config(fakes, canary=0))
        await client.post("/v1/chat/completions", json=CHAT)
        assert candidate.stats.requests == tried
        assert gateway.migration.report_rolled_back() == []
    assert primary.stats.by_status[200] == 81


async def test_rules_change_through_the_admin_api_at_once(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    primary, _, candidate, _ = fakes
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with _running(_config(fakes, canary=100)) as (gateway, client):
        first = await client.post("/v1/chat/completions", json=CHAT)
        assert first.headers["x-tenantware-upstream"] == "relay"
        path = "/admin/migration/rules/trial/candidates/relay"
        bad = await client.patch(path, json={"canary_percent": 101}, headers=admin)
        assert bad.status_code == 400
        assert (await client.patch(path, json={"canary_percent": 0})).status_code == 403
        changed = await client.patch(path, json={"canary_percent": 0}, headers=admin)
        assert changed.status_code == 200
        assert changed.json()["rules"][0]["candidates"][0]["canary_percent"] == 0
        after = await client.post("/v1/chat/completions", json=CHAT)
        assert after.headers["x-tenantware-upstream"] == "main"
        rules = (await client.get("/admin/migration/rules", headers=admin)).json()
        rules["rules"][0]["candidates"][0]["upstream"] = "nowhere"
        unknown = await client.put("/admin/migration/rules", json=rules, headers=admin)
        assert unknown.status_code == 400
        assert "nowhere" in unknown.json()["error"]["message"]
        rules["rules"][0]["candidates"][0].update(upstream="relay", shadow_percent=100)
        assert (await client.put("/admin/migration/rules", json=rules, headers=admin)).is_success
        await client.post("/v1/chat/completions", json=CHAT)
        await wait_for(lambda: candidate.stats.requests == 2 and gateway.migration.in_flight == 0)
        missing = await client.patch(
            "/admin/migration/rules/trial/candidates/other", json={}, headers=admin
        )
        assert missing.status_code == 404
    assert candidate.stats.requests == 2  # the first canary call and one shadow copy
    assert primary.stats.requests == 2


async def test_shadows_are_bounded_dropped_and_cancelled_at_shutdown(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    _primary, _, candidate, _ = fakes
    candidate.config.latency_s = 60.0
    config = _config(fakes, shadow=100, shadow_concurrency=2, shadow_timeout_s=60.0)
    gateway = Gateway(config)
    with anyio.fail_after(30):
        async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
            for _ in range(5):
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await wait_for(lambda: candidate.stats.requests == 2)
            assert gateway.migration.in_flight == 2
            assert gateway.migration.book.dropped["trial/relay/gpt-4.1"] == 3
    # Leaving the gateway's lifetime cancelled the two hanging shadows.
    assert gateway.migration.in_flight == 0


async def test_excluded_tenants_are_never_shadowed(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    _primary, _, candidate, _ = fakes
    async with _running(_config(fakes, shadow=100, no_shadow_tenants=["acme"])) as (
        gateway,
        client,
    ):
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert candidate.stats.requests == 0
    assert gateway.migration.book.report() == []


async def test_a_tenant_flagged_for_data_residency_is_never_sent_to_a_candidate(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
) -> None:
    primary, _, candidate, _ = fakes
    config = _config(fakes, canary=100, shadow=100)
    (acme, *others) = config.tenants
    flagged = msgspec.structs.replace(acme, data=msgspec.structs.replace(acme.data, residency="eu"))
    config = msgspec.structs.replace(config, tenants=[flagged, *others])
    async with _running(config) as (gateway, client):
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            assert response.headers["x-tenantware-upstream"] == "main"
        # The rule opting the region in (through the admin API) lets the trial have it.
        admin = {"authorization": f"Bearer {ADMIN}"}
        rules = (await client.get("/admin/migration/rules", headers=admin)).json()
        rules["rules"][0]["allow_residency"] = ["eu"]
        assert (await client.put("/admin/migration/rules", json=rules, headers=admin)).is_success
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.headers["x-tenantware-upstream"] == "relay"
        await wait_for(lambda: gateway.migration.in_flight == 0)
    assert primary.stats.requests == 3
    assert candidate.stats.requests == 1


def test_cli_shadow_report_and_rollback(
    fakes: tuple[FakeUpstream, str, FakeUpstream, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json
    import time

    from tenantware.cli import main

    _primary, _, candidate, _ = fakes
    gateway = Gateway(_config(fakes, shadow=100))
    with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(3):
                answer = client.post(
                    "/v1/chat/completions",
                    json=CHAT,
                    headers={"authorization": f"Bearer {KEYS['acme']}"},
                )
                assert answer.status_code == 200
        deadline = time.monotonic() + 20
        while candidate.stats.requests < 3 or gateway.migration.in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.setenv("TENANTWARE_URL", url)
        monkeypatch.setenv("TENANTWARE_ADMIN_KEY", ADMIN)
        assert main(["shadow", "report"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["data"]
        assert (row["trial"], row["shadow_requests"]) == ("trial/relay/gpt-4.1", 3)
        assert main(["shadow", "report", "--format", "csv", "--since", "1h"]) == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("trial,trial/relay/gpt-4.1,3,")
        assert main(["shadow", "rollback", "trial", "relay"]) == 0
        out = capsys.readouterr().out  # the server thread's log line of the change comes first
        shares = json.loads(out[out.index("{\n") :])["rules"][0]["candidates"][0]
        assert (shares["canary_percent"], shares["shadow_percent"]) == (0, 0)
        monkeypatch.setenv("TENANTWARE_ADMIN_KEY", "sk-wrong")
        assert main(["shadow", "report"]) == 1
        assert "401" in capsys.readouterr().err
