"""Rules changed at run time reach every replica: migration and alert rules kept in the shared
registry, the comparison report and the rollbacks shared through Redis; without a shared
registry several processes still refuse such a change (409).

Two ``Gateway`` instances in this process stand for two replicas: they share nothing but
Redis (their own registry copies, stores, runners and fake clients are separate)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest

from tenantware import Gateway, parse_config
from tenantware.config import ConfigError
from tenantware.keys import KeyHasher
from tenantware.metering.ledger.histogram import RELATIVE_ERROR
from tenantware.migration import Comparison, ComparisonBook
from tenantware.migration.tally import Tally, row_of
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.metering_support import wait_for
from tests.support import CHAT, KEYS, client_for, tenant_entries

pytestmark = pytest.mark.anyio

ADMIN = "sk-test-shared-rules-admin"
HEADERS = {"authorization": f"Bearer {ADMIN}"}
TRIAL = "trial/relay/gpt-4.1"
RULES = "/admin/migration/rules"
Fakes = tuple[FakeUpstream, str, FakeUpstream, str]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    primary = FakeUpstream(FakeUpstreamConfig())
    candidate = FakeUpstream(FakeUpstreamConfig())
    with (
        serve_in_thread(primary, startup_timeout_s=30) as primary_url,
        serve_in_thread(candidate, startup_timeout_s=30) as candidate_url,
    ):
        yield primary, primary_url, candidate, candidate_url


def _config(
    fakes: Fakes,
    *,
    gateway: dict[str, Any],
    canary: float = 0,
    shadow: float = 0,
    alerts: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
) -> Any:
    _p, primary_url, _c, candidate_url = fakes
    rule = {
        "name": "trial",
        "model": "gpt-4.1",
        "candidates": [{"upstream": "relay", "canary_percent": canary, "shadow_percent": shadow}],
        "rollback_minimum_calls": 5,
    }
    return parse_config(
        {
            "tenants": tenant_entries(),
            "upstreams": [
                {"name": "main", "base_url": primary_url + "/v1", "models": ["gpt-4.1"]},
                {"name": "relay", "base_url": candidate_url + "/v1", "timeout_s": 5},
            ],
            "gateway": {"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}], **gateway},
            "breaker": breaker or {"max_attempts": 2, "retry_base_s": 0.001},
            "metering": {"ledger_url": "memory://", "request_log": False},
            "migration": {"rules": [rule]},
            "alerts": alerts or {},
        }
    )


def _shared(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "registry_url": redis_url,
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "registry_check_s": 60,  # pub/sub alone must carry each change
    }


@asynccontextmanager
async def _replicas(config: Any) -> AsyncIterator[list[tuple[Gateway, httpx.AsyncClient]]]:
    async with AsyncExitStack() as stack:
        pairs = []
        for _ in range(2):
            gateway = Gateway(config)
            await stack.enter_async_context(gateway.running())
            client = await stack.enter_async_context(client_for(gateway.asgi_app(), KEYS["acme"]))
            pairs.append((gateway, client))
        yield pairs


def _shares(gateway: Gateway) -> tuple[float, float]:
    candidate = gateway.config.migration.rules[0].candidates[0]
    return candidate.canary_percent, candidate.shadow_percent


async def _served_by(client: httpx.AsyncClient) -> str:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    return response.headers["x-tenantware-upstream"]


async def test_migration_rules_put_on_one_replica_apply_on_the_other(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    config = _config(fakes, gateway=_shared(redis_url, redis_prefix))
    async with _replicas(config) as [(one, first), (two, second)]:
        assert await _served_by(second) == "main"
        rules = (await first.get(RULES, headers=HEADERS)).json()
        rules["rules"][0]["candidates"][0]["canary_percent"] = 100
        put = await first.put(RULES, json=rules, headers=HEADERS)
        assert put.status_code == 200, put.text
        assert _shares(one) == (100, 0)  # in force here before the answer
        await wait_for(lambda: _shares(two) == (100, 0), timeout=5)
        assert await _served_by(second) == "relay"
        # A PATCH on the other replica starts from the shared rules, not its own copy.
        path = f"{RULES}/trial/candidates/relay"
        patched = await second.patch(path, json={"shadow_percent": 50}, headers=HEADERS)
        assert patched.status_code == 200, patched.text
        await wait_for(lambda: _shares(one) == (100, 50), timeout=5)
        # A reload of the file does not undo it (the registry's rules win, as its tenants do).
        two.live.replace(config)
        assert _shares(two) == (100, 50)
        # Deleting them puts the file's rules back everywhere.
        dropped = await first.delete(RULES, headers=HEADERS)
        assert dropped.status_code == 200, dropped.text
        await wait_for(lambda: _shares(two) == (0, 0) and _shares(one) == (0, 0), timeout=5)
        again = await first.delete(RULES, headers=HEADERS)
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "rules_not_found"
        bad = await second.put(RULES, json={"rules": [{"name": "x"}]}, headers=HEADERS)
        assert bad.status_code == 400
        # Each replica's ledger (here one in memory each) holds the changes it made.
        audit_one = (await first.get("/admin/audit?limit=10", headers=HEADERS)).json()["data"]
        audit_two = (await second.get("/admin/audit?limit=10", headers=HEADERS)).json()["data"]
    assert [e["action"] for e in audit_one] == ["migration_rules.delete", "migration_rules.update"]
    (patch_entry,) = audit_two
    assert patch_entry["action"] == "migration_rules.update"
    assert patch_entry["actor"] == "admin:ops"
    assert patch_entry["before"]["rules"][0]["candidates"][0]["shadow_percent"] == 0
    assert patch_entry["after"]["rules"][0]["candidates"][0]["shadow_percent"] == 50


async def test_shared_rules_are_checked_against_the_registry_and_outlive_a_bad_reload(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    config = _config(fakes, gateway=_shared(redis_url, redis_prefix))
    async with _replicas(config) as [(one, first), (_two, second)]:
        created = await first.post(
            "/admin/tenants", json={"id": "globex", "tier": "free"}, headers=HEADERS
        )
        assert created.status_code == 201, created.text
        rules = (await first.get(RULES, headers=HEADERS)).json()
        rules["rules"][0]["tenants"] = ["globex"]  # known to the registry, not to the file
        put = await second.put(RULES, json=rules, headers=HEADERS)
        assert put.status_code == 200, put.text
        await wait_for(lambda: one.config.migration.rules[0].tenants == ["globex"], timeout=5)
        # A file without the candidate's upstream cannot take the stored rules: the reload
        # is refused and the running configuration stays.
        data = msgspec.to_builtins(config)
        data["upstreams"] = data["upstreams"][:1]
        data["migration"] = {}
        with pytest.raises(ConfigError, match="relay"):
            one.live.replace(parse_config(data))
        assert one.config.migration.rules[0].tenants == ["globex"]


async def test_alert_rules_put_on_one_replica_apply_on_the_other(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    rule = {
        "id": "errors",
        "kind": "error_rate",
        "threshold": 0.5,
        "window_s": 1.0,
        "min_requests": 3,
    }
    config = _config(fakes, gateway=_shared(redis_url, redis_prefix))
    async with _replicas(config) as [(one, first), (two, second)]:
        defaults = (await second.get("/admin/alerts/rules", headers=HEADERS)).json()["data"]
        put = await first.put("/admin/alerts/rules", json={"data": [rule]}, headers=HEADERS)
        assert put.status_code == 200, put.text
        await wait_for(lambda: two.config.alerts.rules is not None, timeout=5)
        seen = (await second.get("/admin/alerts/rules", headers=HEADERS)).json()["data"]
        assert [(r["id"], r["threshold"]) for r in seen] == [("errors", 0.5)]
        dropped = await second.delete("/admin/alerts/rules", headers=HEADERS)
        assert dropped.status_code == 200
        await wait_for(lambda: one.config.alerts.rules is None, timeout=5)
        back = (await first.get("/admin/alerts/rules", headers=HEADERS)).json()["data"]
    assert back == defaults != seen


async def test_the_report_sums_every_replica(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    primary, _, candidate, _ = fakes
    candidate.config.stream_chunks = 7  # a longer answer: the same words, more of them
    config = _config(fakes, gateway=_shared(redis_url, redis_prefix), shadow=100)
    async with _replicas(config) as [(one, first), (two, second)]:
        for client, count in ((first, 3), (second, 4)):
            for _ in range(count):
                assert (await client.post("/v1/chat/completions", json=CHAT)).is_success
        for gateway in (one, two):
            await wait_for(lambda g=gateway: g.migration.in_flight == 0, timeout=30)
        await two.migration.flush()  # the answering replica flushes its own
        answer = await first.get("/admin/migration/report", headers=HEADERS)
        csv_answer = await second.get("/admin/migration/report?format=csv", headers=HEADERS)
        later = await first.get("/admin/migration/report?since=4102444800", headers=HEADERS)
        dashboard = await first.get("/admin/dashboard/migration?range=1h", headers=HEADERS)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scope"] == "shared"
    (row,) = body["data"]
    assert row["trial"] == TRIAL
    assert row["shadow_requests"] == candidate.stats.requests == 7
    assert row["shadow_error_rate"] == row["primary_error_rate"] == 0.0
    assert row["shadow_tokens_per_request"] == (
        (candidate.stats.prompt_tokens + candidate.stats.completion_tokens) / 7
    )
    assert row["primary_tokens_per_request"] == (
        (primary.stats.prompt_tokens + primary.stats.completion_tokens) / 7
    )
    assert row["exact_match_rate"] == 0.0
    assert row["similarity_mean"] == 1.0
    assert row["shadow_latency_p99_s"] is not None
    assert csv_answer.text.splitlines()[1].startswith(f"trial,{TRIAL},7,")
    assert later.json()["data"] == []
    # The operator page's trial table is the fleet's too (its chart is the process's).
    assert dashboard.status_code == 200, dashboard.text
    view = dashboard.json()
    assert view["scope"] == "shared"
    (trial,) = [t for t in view["trials"] if t["trial"] == TRIAL]
    assert trial["figures"]["shadow_requests"] == 7


async def test_a_rollback_judged_on_one_replica_holds_on_every_one(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    _, _, candidate, _ = fakes
    candidate.config.failure_rate = 1.0
    # No circuits: only the rollback keeps the other replica from calling the candidate.
    config = _config(
        fakes, gateway=_shared(redis_url, redis_prefix), canary=50, breaker={"enabled": False}
    )
    async with _replicas(config) as [(one, first), (two, second)]:
        for index in range(60):
            response = await first.post(
                "/v1/chat/completions", json=CHAT, headers={"x-session-id": f"s{index}"}
            )
            assert response.status_code == 200  # the failed canary call moved on
        assert one.migration.report_rolled_back() == [TRIAL]
        # The other replica sent the candidate nothing: it can only learn it through Redis
        # (its flush task may have done so already).
        assert two.migration.rollbacks.count == 0
        await one.migration.flush()
        await two.migration.flush()
        assert two.migration.report_rolled_back() == [TRIAL]
        tried = candidate.stats.requests
        for index in range(20):
            response = await second.post(
                "/v1/chat/completions", json=CHAT, headers={"x-session-id": f"s{index}"}
            )
            assert response.headers["x-tenantware-upstream"] == "main"
        assert candidate.stats.requests == tried  # no canary call from the other replica
        report = (await second.get("/admin/migration/report", headers=HEADERS)).json()
    (row,) = report["data"]
    assert row["rolled_back"] is True
    assert row["canary_requests"] == tried
    assert row["canary_error_rate"] == 1.0


@pytest.mark.parametrize("store", ["none", "redis_url only"])
async def test_without_a_shared_registry_several_processes_still_refuse(
    fakes: Fakes, redis_url: str, redis_prefix: str, store: str
) -> None:
    gateway_settings: dict[str, Any] = {"replicas": 2}
    if store != "none":
        gateway_settings.update(redis_url=redis_url, redis_prefix=redis_prefix)
    config = _config(fakes, gateway=gateway_settings)
    async with _replicas(config) as [(one, first), _second]:
        rules = (await first.get(RULES, headers=HEADERS)).json()
        answers = {
            "put": await first.put(RULES, json=rules, headers=HEADERS),
            "patch": await first.patch(
                f"{RULES}/trial/candidates/relay", json={"canary_percent": 5}, headers=HEADERS
            ),
            "delete": await first.delete(RULES, headers=HEADERS),
            "alerts": await first.put("/admin/alerts/rules", json={"data": []}, headers=HEADERS),
        }
        assert _shares(one) == (0, 0)
    codes = {name: (a.status_code, a.json()["error"]["code"]) for name, a in answers.items()}
    assert codes == {
        "put": (409, "migration_rules_not_shared"),
        "patch": (409, "migration_rules_not_shared"),
        "delete": (409, "migration_rules_not_shared"),
        "alerts": (409, "alert_rules_not_shared"),
    }
    assert "reload every process" in answers["put"].json()["error"]["message"]


async def test_one_process_on_the_file_keeps_the_file_as_last_word(fakes: Fakes) -> None:
    config = _config(fakes, gateway={})
    async with _replicas(config) as [(one, first), (two, _second)]:
        patched = await first.patch(
            f"{RULES}/trial/candidates/relay", json={"canary_percent": 5}, headers=HEADERS
        )
        assert patched.status_code == 200
        assert _shares(one) == (5, 0)
        assert _shares(two) == (0, 0)  # nothing is shared: the other stays as it was
        one.live.replace(config)
        assert _shares(one) == (0, 0)
        gone = await first.delete(RULES, headers=HEADERS)
    assert gone.status_code == 409


def _comparisons(count: int, seed: int) -> list[Comparison]:
    rng = random.Random(seed)
    made = []
    for index in range(count):
        shadow = rng.random() < 0.7
        answered = rng.random() < 0.9
        made.append(
            Comparison(
                kind="shadow" if shadow else "canary",
                ts=1_700_000_000 + index,
                rule="trial",
                trial=TRIAL,
                tenant="acme",
                request_id=f"r{index}",
                outcome="ok" if answered else rng.choice(["error", "timeout"]),
                latency_s=rng.lognormvariate(-1, 1),
                ttft_s=rng.lognormvariate(-2, 1) if rng.random() < 0.5 else None,
                input_tokens=rng.randrange(100),
                output_tokens=rng.randrange(100),
                cost_nanousd=rng.randrange(10_000),
                primary_outcome="ok" if rng.random() < 0.95 else "error",
                primary_latency_s=rng.lognormvariate(-1, 0.5),
                primary_ttft_s=rng.lognormvariate(-2, 0.5),
                primary_input_tokens=rng.randrange(100),
                primary_output_tokens=rng.randrange(100),
                primary_cost_nanousd=rng.randrange(10_000),
                exact=(rng.random() < 0.3) if answered and shadow else None,
                similarity=rng.random() if answered and shadow else None,
                same_tools=(rng.random() < 0.8) if answered and shadow else None,
            )
        )
    return made


@pytest.mark.parametrize("seed", range(5))
async def test_counters_give_the_books_figures(seed: int) -> None:
    """Folded into counters (in two shares, as two processes would), the comparisons give the
    in-process book's row: counts, rates, sums exactly; percentiles within the buckets' error."""
    entries = _comparisons(500, seed)
    book = ComparisonBook()
    halves = Tally(), Tally()
    for index, entry in enumerate(entries):
        book.add(entry)
        halves[index % 2].add(entry)
    summed: dict[str, int] = {}
    for tally in halves:
        for fields in tally.take().values():
            for field, value in fields.items():
                summed[field] = summed.get(field, 0) + value
    (exact,) = book.report()
    shared = msgspec.to_builtins(row_of("trial", TRIAL, summed, False))
    for field, value in msgspec.to_builtins(exact).items():
        if field.endswith(("_p50_s", "_p99_s")):
            assert shared[field] == pytest.approx(value, rel=RELATIVE_ERROR + 1e-9), field
        elif field == "similarity_mean":
            assert shared[field] == pytest.approx(value, abs=1e-6)
        else:
            assert shared[field] == pytest.approx(value), field


async def test_a_registry_that_lost_its_data_is_seeded_with_the_rules_too(
    fakes: Fakes, redis_url: str, redis_prefix: str
) -> None:
    import redis as redis_sync

    config = _config(fakes, gateway=_shared(redis_url, redis_prefix))
    async with _replicas(config) as [(one, first), (two, _second)]:
        patched = await first.patch(
            f"{RULES}/trial/candidates/relay", json={"canary_percent": 7}, headers=HEADERS
        )
        assert patched.status_code == 200
        await wait_for(lambda: _shares(two) == (7, 0), timeout=5)
        with redis_sync.Redis.from_url(redis_url) as client:  # a Redis restarted empty
            client.delete(*client.scan_iter(match=f"{redis_prefix}tw:{{registry}}:*"))
        await two.registry.refresh()  # its version check would do it within registry_check_s
        stored = await one.registry_store.get_rules("migration")
        await one.registry.refresh()
        assert _shares(one) == _shares(two) == (7, 0)
    assert stored is not None
    assert b'"canary_percent":7' in stored.document
