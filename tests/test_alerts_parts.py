"""The alert engine's parts: stores (memory and Redis), the lease, rule judging, delivery
bounds, configuration checks and the Prometheus rules export."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tenantware.alerts import Alert, AlertEvent, MemoryAlertStore
from tenantware.alerts.delivery import Dispatcher, TokenBucket
from tenantware.alerts.payload import Message
from tenantware.alerts.rules import WindowRule
from tenantware.alerts.store import AlertStore
from tenantware.cli import main
from tenantware.config import AlertRule, ConfigError, parse_config
from tenantware.metering.ledger import UsageRecord
from tests.support import make_config

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AlertStore]:
    if request.param == "memory":
        yield MemoryAlertStore()
        return
    from tenantware.alerts.redis import RedisAlertStore
    from tenantware.backends.redis_support import connect_redis

    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    client = connect_redis(url, timeout_s=1.0)
    try:
        yield RedisAlertStore(client, prefix=prefix)
    finally:
        await client.aclose()


async def test_counts_of_every_replica_add_up(store: AlertStore) -> None:
    await store.add_counts({("r", "acme", 10): [3, 1]}, oldest_bucket=0, ttl_s=60)
    await store.add_counts(
        {("r", "acme", 10): [2, 2], ("r", "", 11): [1, 0]}, oldest_bucket=0, ttl_s=60
    )
    assert await store.read_counts(10, 11) == {("r", "acme", 10): [5, 3], ("r", "", 11): [1, 0]}
    assert await store.read_counts(11, 11) == {("r", "", 11): [1, 0]}


async def test_one_lease_holder_at_a_time(store: AlertStore) -> None:
    assert await store.acquire("a", 5.0)
    assert await store.acquire("a", 5.0)  # renewed
    if store.shared:
        assert not await store.acquire("b", 5.0)
        await store.release("b")  # not the holder: nothing changes
        assert not await store.acquire("b", 5.0)
        await store.release("a")
        assert await store.acquire("b", 5.0)


async def test_facts_take_the_earliest_fresh_report(store: AlertStore) -> None:
    await store.report_facts("r1", {"ledger": 50.0, "circuit:x/m": 70.0}, now=100.0)
    await store.report_facts("r2", {"circuit:x/m": 60.0}, now=100.0)
    await store.report_facts("gone", {"store": 1.0}, now=10.0)
    assert await store.facts(101.0, max_age_s=5) == {"ledger": 50.0, "circuit:x/m": 60.0}


async def test_active_alerts_and_capped_history(store: AlertStore) -> None:
    alert = Alert(
        fingerprint="r:acme",
        rule="r",
        kind="error_rate",
        severity="warning",
        scope="tenant",
        group="acme",
        tenant="acme",
        summary="s",
        value=0.5,
        threshold=0.1,
        started_at=1.0,
    )
    await store.set_active(alert)
    assert await store.active() == {"r:acme": alert}
    await store.clear_active("r:acme")
    assert await store.active() == {}
    for n in range(5):
        event = AlertEvent(id=str(n), ts=float(n), event="fired", fingerprint="r:acme", rule="r")
        await store.record(event, keep=3)
    assert [e.id for e in await store.history(10)] == ["4", "3", "2"]


def _record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {"record_id": "r", "request_id": "q", "ts": 1.0, "tenant": "acme"}
    return UsageRecord(**{**base, **fields})


def test_a_percentile_over_a_threshold_is_a_share_of_slow_requests() -> None:
    rule = WindowRule(
        AlertRule(id="p90", kind="latency", threshold=0.1, percentile=90, min_requests=10), {}
    )
    assert rule.judge(_record(latency_s=0.2, outcome="ok")) == ("", True)
    assert rule.judge(_record(latency_s=0.05, outcome="ok")) == ("", False)
    # A client's own refusal is no latency of the gateway.
    assert rule.judge(_record(latency_s=5.0, outcome="rejected_auth")) is None
    assert rule.firing(100, 10) == (0.1, False)  # p90 exactly at the threshold
    assert rule.firing(100, 11) == (0.11, True)
    assert rule.firing(9, 9) == (1.0, False)  # too few requests to judge


def test_added_latency_leaves_streams_out_and_scopes_group_records() -> None:
    added = WindowRule(
        AlertRule(id="a", kind="latency", metric="added_latency", scope="tier", threshold=0.1),
        {"acme": "enterprise"},
    )
    record = _record(latency_s=1.0, upstream_latency_s=0.8, outcome="ok")
    assert added.judge(record) == ("enterprise", True)
    assert added.judge(_record(latency_s=1.0, upstream_latency_s=0.8, stream=True)) is None
    errors = WindowRule(
        AlertRule(id="e", kind="error_rate", scope="upstream", match=["a"], threshold=0.1), {}
    )
    assert errors.judge(_record(upstream="a", outcome="upstream_error")) == ("a", True)
    assert errors.judge(_record(upstream="b", outcome="upstream_error")) is None
    queue = WindowRule(AlertRule(id="q", kind="queue_wait", threshold=1.0), {})
    # Timing out in the queue is the longest wait of all.
    assert queue.judge(_record(outcome="rejected_queue")) == ("", True)


def _message(tenant: str | None = "acme", severity: str = "warning") -> Message:
    alert = Alert(
        fingerprint="r:x",
        rule="r",
        kind="error_rate",
        severity=severity,
        scope="tenant",
        group="x",
        tenant=tenant,
        summary="s",
        value=1.0,
        threshold=0.1,
        started_at=1.0,
    )
    return Message(id="m", status="firing", alert=alert)


async def test_a_full_queue_drops_new_messages_and_says_so() -> None:
    config = make_config(
        alerts={
            "destinations": [{"id": "ops", "url": "http://127.0.0.1:9/ops"}],
            "queue_size": 1,
        }
    )
    recorded: list[AlertEvent] = []

    async def record(event: AlertEvent) -> None:
        recorded.append(event)

    async with httpx.AsyncClient() as client:
        dispatcher = Dispatcher(config.alerts, client, record)
        for _ in range(3):
            await dispatcher.submit(_message())
        await dispatcher.aclose()
    assert [(e.event, e.destination, e.detail) for e in recorded] == [
        ("dropped", "ops", "queue full"),
        ("dropped", "ops", "queue full"),
    ]


async def test_the_rate_limit_makes_a_burst_wait() -> None:
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(2, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        await bucket.take()
    assert waits == [30.0]  # the third of a burst waits for its token: 60 s / 2


def test_destinations_and_rules_name_what_exists() -> None:
    hook = {"id": "t", "url": "http://127.0.0.1:9/"}
    with pytest.raises(ConfigError, match="unknown tenant 'nobody'"):
        make_config(alerts={"destinations": [{**hook, "tenant": "nobody"}]})
    with pytest.raises(ConfigError, match="unknown upstream"):
        make_config(
            alerts={
                "rules": [
                    {"id": "c", "kind": "circuit_open", "scope": "upstream", "match": ["nope"]}
                ]
            }
        )
    with pytest.raises(ConfigError, match="fraction"):
        make_config(alerts={"rules": [{"id": "e", "kind": "error_rate", "threshold": 5}]})
    with pytest.raises(ConfigError, match="duplicate alert rule"):
        make_config(alerts={"rules": [{"id": "e", "kind": "error_rate"}] * 2})
    assert not parse_config({}).alerts.active()  # the defaults stay off without a destination


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        """
[[tenants]]
id = "acme"
tier = "pro"
limits = { daily_budget_usd = "10", monthly_budget_usd = "100" }

[[upstreams]]
name = "fake"
base_url = "http://127.0.0.1:9/v1"
models = ["gpt-4.1"]

[[alerts.destinations]]
id = "ops"
url = "http://127.0.0.1:9/hook"

[[alerts.rules]]
id = "tier-errors"
kind = "error_rate"
scope = "tier"
threshold = 0.01

[[alerts.rules]]
id = "upstream-latency"
kind = "latency"
scope = "upstream"
threshold = 0.15
percentile = 99

[[alerts.rules]]
id = "tenant-circuit"
kind = "circuit_open"
scope = "tenant"
threshold = 30
"""
    )
    return path


def test_export_rules_writes_every_rule_it_can_express(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path)
    out = tmp_path / "rules.yml"
    assert main(["alerts", "export-rules", "--config", str(config), "-o", str(out)]) == 0
    text = out.read_text()
    document = yaml.safe_load(text)
    (group,) = document["groups"]
    rules = {rule["labels"]["rule"]: rule for rule in group["rules"]}
    assert set(rules) == {"tier-errors", "upstream-latency"}
    assert 'tenant=~"acme"' in rules["tier-errors"]["expr"]
    assert "> 0.01" in rules["tier-errors"]["expr"]
    assert 'model=~"gpt-4\\\\.1"' in rules["upstream-latency"]["expr"]
    assert rules["upstream-latency"]["expr"].startswith("histogram_quantile(0.99")
    assert "tenant-circuit: tenant circuits have no metric" in text
    # Every rule has the fields a Prometheus rule file requires, and nothing else.
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert isinstance(rule["alert"], str)
        assert isinstance(rule["expr"], str)
    assert main(["alerts", "export-rules", "--config", str(config)]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_exported_rules(tmp_path: Path) -> None:
    out = tmp_path / "rules.yml"
    # The file's own rules and the defaults (with a budget, so spend rules are written).
    for config in (_config_file(tmp_path), None):
        if config is None:
            config = tmp_path / "defaults.toml"
            text = _config_file(tmp_path).read_text()
            config.write_text(text[: text.index("[[alerts.rules]]")])
        assert main(["alerts", "export-rules", "--config", str(config), "-o", str(out)]) == 0
        checked = subprocess.run(
            ["promtool", "check", "rules", str(out)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "SUCCESS" in checked.stdout


def test_export_rules_without_a_config_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TENANTWARE_CONFIG", raising=False)
    assert main(["alerts", "export-rules"]) == 2
    assert "--config is required" in capsys.readouterr().err
