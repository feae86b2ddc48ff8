"""Alerts end to end: the fake upstream drives each rule kind, a local receiver gets the
webhooks; fired once, resolved when the condition clears, signed, retried, tenant-scoped."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway
from tenantware.alerts import verify_signature
from tenantware.backends.failover import StoreHealth
from tenantware.metering.ledger import LedgerUnavailable, MemoryLedger, UsageRecord
from tenantware.testing.upstream import FakeUpstream
from tests.alert_support import (
    SECRET,
    SECRET_ENV,
    TENANT_SECRET,
    TENANT_SECRET_ENV,
    alert_config,
    receiver,
    repeat_until,
    wait_until,
)
from tests.support import CHAT, KEYS, client_for, in_process_gateway

pytestmark = pytest.mark.anyio

FAST_ERRORS = {
    "id": "errors",
    "kind": "error_rate",
    "scope": "tenant",
    "threshold": 0.5,
    "window_s": 60.0,
    "min_requests": 3,
}


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(TENANT_SECRET_ENV, TENANT_SECRET)


async def _send(client: httpx.AsyncClient, count: int, body: dict[str, Any] = CHAT) -> None:
    for _ in range(count):
        await client.post("/v1/chat/completions", json=body)


async def test_error_rate_fires_once_signed_tenant_scoped_and_resolves() -> None:
    with receiver() as (hooks, url):
        config = alert_config(url, [FAST_ERRORS], breaker={"enabled": False})
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 6)
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            await wait_until(lambda: hooks.delivered("/acme", "firing"))
            # Still failing: the alert holds, nothing new is sent.
            await _send(acme, 3)
            fake.config.failure_rate = 0.0
            # Successes bring the window's error rate under the threshold.
            await repeat_until(lambda: hooks.delivered("/ops", "resolved"), lambda: _send(acme, 1))
            await wait_until(lambda: hooks.delivered("/acme", "resolved"))
    fired = hooks.delivered("/ops", "firing")
    assert len(fired) == 1
    alert = fired[0]["alert"]
    assert fired[0]["version"] == 1
    assert alert["rule"] == "errors"
    assert alert["kind"] == "error_rate"
    assert alert["tenant"] == "acme"
    assert alert["group"] == "acme"
    assert alert["value"] == 1.0
    assert alert["resolved_at"] is None
    resolved = hooks.delivered("/ops", "resolved")
    assert len(resolved) == 1
    assert resolved[0]["alert"]["fingerprint"] == alert["fingerprint"]
    assert resolved[0]["alert"]["resolved_at"] >= alert["started_at"]
    # The other tenant's webhook never hears of acme's alert.
    assert hooks.at("/hobby") == []
    # Every delivery is signed with its destination's secret over "<t>." + body.
    for path, secret in (("/ops", SECRET), ("/acme", TENANT_SECRET)):
        for hit in hooks.at(path):
            header = hit.headers["tenantware-signature"]
            assert verify_signature(secret.encode(), hit.body, header)
            assert not verify_signature(b"another secret", hit.body, header)
            stamp, digest = (part.split("=", 1)[1] for part in header.split(","))
            expected = hmac.new(
                secret.encode(), stamp.encode() + b"." + hit.body, hashlib.sha256
            ).hexdigest()
            assert hmac.compare_digest(digest, expected)
            assert hit.headers["tenantware-event-id"] == hit.json()["id"]


async def test_a_replayed_or_altered_delivery_fails_verification() -> None:
    from tenantware.alerts import sign

    body = b'{"version":1}'
    header = sign(b"s3cret", body, 1_000_000)
    assert verify_signature(b"s3cret", body, header, now=1_000_010)
    assert not verify_signature(b"s3cret", body, header, now=1_000_000 + 301)
    assert not verify_signature(b"s3cret", body + b" ", header, now=1_000_010)
    assert not verify_signature(b"s3cret", body, "t=abc,v1=00", now=1_000_010)


async def test_a_failing_receiver_gets_the_same_event_again_until_it_takes_it() -> None:
    with receiver() as (hooks, url):
        hooks.fail_next = {"/ops": 2}
        config = alert_config(url, [FAST_ERRORS], breaker={"enabled": False})
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 5)
            engine = gateway.alerts
            assert engine is not None

            async def delivered() -> list[Any]:
                return [e for e in await engine.history(limit=100) if e.event == "delivered"]

            with anyio.fail_after(20):
                while not [e for e in await delivered() if e.destination == "ops"]:
                    await anyio.sleep(0.02)
            entry = next(e for e in await delivered() if e.destination == "ops")
    ops = hooks.at("/ops")
    # Two refusals, then the same event (same id) delivered on the third attempt.
    assert [hit.json()["id"] for hit in ops[:3]] == [ops[0].json()["id"]] * 3
    assert entry.attempts == 3
    assert entry.status == "firing"


async def test_latency_and_ttft_percentiles_over_their_threshold() -> None:
    rules = [
        {
            "id": "slow",
            "kind": "latency",
            "threshold": 0.05,
            "percentile": 50,
            "window_s": 60.0,
            "min_requests": 3,
        },
        {
            "id": "first-token",
            "kind": "latency",
            "metric": "ttft",
            "scope": "model",
            "threshold": 0.05,
            "percentile": 50,
            "window_s": 60.0,
            "min_requests": 3,
        },
    ]
    with receiver() as (hooks, url):
        gateway, fake = in_process_gateway(config=alert_config(url, rules))
        fake.config.latency_s = 0.1
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 4)
            await _send(acme, 4, {**CHAT, "stream": True})
            await wait_until(lambda: len(hooks.delivered("/ops", "firing")) == 2)
            fake.config.latency_s = 0.0

            async def fast() -> None:
                await _send(acme, 1)
                await _send(acme, 1, {**CHAT, "stream": True})

            await repeat_until(lambda: len(hooks.delivered("/ops", "resolved")) == 2, fast)
    fired = {p["alert"]["rule"]: p["alert"] for p in hooks.delivered("/ops", "firing")}
    assert fired["slow"]["group"] == ""
    assert fired["first-token"]["group"] == "gpt-4.1"
    # Neither names a tenant: the tenants' own webhooks get nothing.
    assert hooks.at("/acme") == []
    assert hooks.at("/hobby") == []


async def test_queue_wait_over_its_bound() -> None:
    rules = [
        {
            "id": "queued",
            "kind": "queue_wait",
            "scope": "tenant",
            "threshold": 0.02,
            "percentile": 50,
            "window_s": 60.0,
            "min_requests": 3,
        }
    ]
    with receiver() as (hooks, url):
        config = alert_config(url, rules, admission={"seats": 1})
        gateway, fake = in_process_gateway(config=config)
        fake.config.latency_s = 0.1
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            async with anyio.create_task_group() as group:
                for _ in range(4):
                    group.start_soon(_send, acme, 1)
            await wait_until(lambda: hooks.delivered("/acme", "firing"))
            # One at a time nothing queues: the share of long waits falls under the bound.
            await repeat_until(lambda: hooks.delivered("/acme", "resolved"), lambda: _send(acme, 1))
    alert = hooks.delivered("/ops", "firing")[0]["alert"]
    assert (alert["rule"], alert["tenant"]) == ("queued", "acme")


async def test_spend_reaching_a_share_of_the_daily_budget() -> None:
    rules = [
        {"id": "budget", "kind": "spend", "scope": "tenant", "threshold": 0.005, "budget": "daily"}
    ]
    with receiver() as (hooks, url):
        config = alert_config(url, rules)
        tenants = [dict(t) for t in config_tenants(config)]
        # One cent a day: three short gpt-4.1 answers pass half a percent of it.
        tenants[0]["limits"] = {"daily_budget_usd": "0.01"}
        config = alert_config(url, rules, tenants=tenants)
        gateway, _ = in_process_gateway(config=config)
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 3, {**CHAT, "max_tokens": 5})
            await wait_until(lambda: hooks.delivered("/acme", "firing"))
    alert = hooks.delivered("/acme", "firing")[0]["alert"]
    assert alert["kind"] == "spend"
    assert alert["tenant"] == "acme"
    assert alert["value"] >= 0.005
    assert hooks.at("/hobby") == []


async def test_a_prepaid_balance_under_its_threshold_then_topped_up() -> None:
    rules = [{"id": "low", "kind": "balance", "scope": "tenant", "threshold": 0}]
    with receiver() as (hooks, url):
        config = alert_config(url, rules)
        tenants = [dict(t) for t in config_tenants(config)]
        tenants[0] = {**tenants[0], "billing": "prepaid", "low_balance_usd": "0.002"}
        config = alert_config(url, rules, tenants=tenants)
        gateway, _ = in_process_gateway(config=config)
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            low = 2_000_000
            await gateway.quota_store.credit("acme", "first", 3_000_000, low)
            # Above its threshold: nothing fires, however often the rules are judged.
            await anyio.sleep(0.3)
            assert hooks.delivered("/acme", "firing") == []

            async def spend() -> None:
                await acme.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50})

            balance = await gateway.quota_store.balance("acme")
            assert balance is not None
            await repeat_until(lambda: hooks.delivered("/acme", "firing"), spend)
            balance = await gateway.quota_store.balance("acme")
            assert balance is not None
            assert balance < low
            await gateway.quota_store.credit("acme", "second", 5_000_000, low)
            await wait_until(lambda: hooks.delivered("/acme", "resolved"))
    alert = hooks.delivered("/acme", "firing")[0]["alert"]
    assert (alert["kind"], alert["tenant"], alert["rule"]) == ("balance", "acme", "low")
    assert alert["value"] < 0.002
    assert hooks.at("/hobby") == []  # postpaid, and not its alert


def config_tenants(config: Any) -> list[dict[str, Any]]:
    import msgspec

    return [msgspec.to_builtins(t) for t in config.tenants]


async def test_circuit_open_longer_than_its_bound_then_closed() -> None:
    rules = [{"id": "circuit", "kind": "circuit_open", "scope": "upstream", "threshold": 0}]
    breaker = {
        "max_attempts": 1,
        "deployment": {
            "consecutive_failures": 2,
            "open_wait_s": 0.1,
            "max_open_wait_s": 0.1,
            "half_open_probes": 1,
        },
    }
    with receiver() as (hooks, url):
        gateway, fake = in_process_gateway(config=alert_config(url, rules, breaker=breaker))
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 3)
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            fake.config.failure_rate = 0.0

            async def until_closed() -> None:
                while not hooks.delivered("/ops", "resolved"):
                    await _send(acme, 1)
                    await anyio.sleep(0.05)

            with anyio.fail_after(20):
                await until_closed()
    alert = hooks.delivered("/ops", "firing")[0]["alert"]
    assert alert["group"] == "fake/gpt-4.1"
    assert alert["kind"] == "circuit_open"


class _FlakyLedger(MemoryLedger):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def write(self, records: Any) -> None:
        if self.down:
            raise LedgerUnavailable("connection refused")
        await super().write(records)


async def test_ledger_failing_with_records_waiting_then_recovered() -> None:
    rules = [{"id": "ledger", "kind": "ledger_spilling", "threshold": 0}]
    with receiver() as (hooks, url):
        ledger = _FlakyLedger()
        fake = FakeUpstream()
        client = _upstream(fake)
        gateway = Gateway(alert_config(url, rules), upstream_client=client, ledger=ledger)
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
            await _send(acme, 2)
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            ledger.down = False
            await wait_until(lambda: hooks.delivered("/ops", "resolved"))
    assert hooks.delivered("/ops", "firing")[0]["alert"]["kind"] == "ledger_spilling"


def _upstream(fake: FakeUpstream) -> Any:
    from tenantware import HttpxUpstreamClient

    return HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))


async def test_store_failover_is_reported_by_the_replica_that_sees_it() -> None:
    from tenantware.alerts import AlertEngine, MemoryAlertStore
    from tenantware.state import LiveConfig

    rules = [{"id": "store", "kind": "store_failover", "threshold": 0}]
    with receiver() as (hooks, url):
        live = LiveConfig(alert_config(url, rules))
        health = StoreHealth()
        engine = AlertEngine(live, MemoryAlertStore(), store_health=health, replica="r1")
        async with engine.running():
            health.failed()  # what a layer reports on outage evidence
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            health.succeeded()
            await wait_until(lambda: hooks.delivered("/ops", "resolved"))
    alert = hooks.delivered("/ops", "firing")[0]["alert"]
    assert alert["fingerprint"] == "store:r1"


async def test_slack_format_and_min_severity() -> None:
    with receiver() as (hooks, url):
        config = alert_config(
            url,
            [FAST_ERRORS],
            breaker={"enabled": False},
            alerts={
                "destinations": [
                    {"id": "slack", "url": f"{url}/slack", "format": "slack"},
                    {"id": "pager", "url": f"{url}/pager", "min_severity": "critical"},
                ]
            },
        )
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
            await _send(acme, 5)
            await wait_until(lambda: hooks.at("/slack"))
    text = hooks.at("/slack")[0].json()["text"]
    assert "FIRING" in text
    assert "errors" in text
    assert "acme" in text
    # A warning never reaches a destination that wants critical ones only.
    assert hooks.at("/pager") == []
    assert "tenantware-signature" not in hooks.at("/slack")[0].headers


async def test_fires_once_across_two_gateways_sharing_redis(
    redis_url: str, redis_prefix: str
) -> None:
    with receiver() as (hooks, url):
        gateways: list[Gateway] = []
        fake = FakeUpstream()
        fake.config.failure_rate = 1.0
        for _ in range(2):
            config = alert_config(
                url,
                [{**FAST_ERRORS, "min_requests": 6}],
                breaker={"enabled": False},
                gateway={"redis_url": redis_url, "redis_prefix": redis_prefix},
            )
            gateways.append(in_process_gateway(fake, config)[0])
        first, second = gateways
        async with (
            first.running(),
            second.running(),
            client_for(first.asgi_app(), KEYS["acme"]) as one,
            client_for(second.asgi_app(), KEYS["acme"]) as two,
        ):
            # Three failures on each: neither has enough alone, together they fire.
            await _send(one, 3)
            await _send(two, 3)
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            await _send(one, 2)
            await _send(two, 2)
            fake.config.failure_rate = 0.0

            async def succeed() -> None:
                await _send(one, 1)
                await _send(two, 1)

            await repeat_until(lambda: hooks.delivered("/ops", "resolved"), succeed)
            assert first.alerts is not None
            assert second.alerts is not None
            assert first.alerts.leader != second.alerts.leader
            history = await second.alerts.history(limit=100)
    assert len(hooks.delivered("/ops", "firing")) == 1
    assert len(hooks.delivered("/ops", "resolved")) == 1
    assert len(hooks.delivered("/acme", "firing")) == 1
    assert [e.event for e in history if e.event in ("fired", "resolved")] == [
        "resolved",
        "fired",
    ]


async def test_alerts_stay_off_without_a_destination() -> None:
    gateway, _ = in_process_gateway()
    assert gateway.alerts is None
    assert gateway.writer is not None
    assert len(gateway.writer.observers) == 2


def _record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {"record_id": "r", "request_id": "q", "ts": 100.0, "tenant": "acme"}
    return UsageRecord(**{**base, **fields})


async def test_alert_history_through_the_admin_api() -> None:
    from tenantware import KeyHasher

    admin_key = "sk-test-alert-admin"
    with receiver() as (hooks, url):
        config = alert_config(
            url,
            [FAST_ERRORS],
            breaker={"enabled": False},
            gateway={"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(admin_key)}]},
        )
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with (
            gateway.running(),
            client_for(app, KEYS["acme"]) as acme,
            client_for(app, KEYS["hobby"]) as hobby,
            client_for(app, admin_key) as admin,
        ):
            await _send(acme, 5)
            await wait_until(lambda: hooks.delivered("/acme", "firing"))
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            everything = (await admin.get("/admin/alerts")).json()["data"]
            active = (await admin.get("/admin/alerts/active")).json()["data"]
            own = (await acme.get("/admin/alerts", params={"event": "delivered"})).json()
            others = (await hobby.get("/admin/alerts")).json()["data"]
            peeking = await hobby.get("/admin/alerts", params={"tenant": "acme"})
            hobby_active = (await hobby.get("/admin/alerts/active")).json()["data"]
            bad_event = await admin.get("/admin/alerts", params={"event": "exploded"})
            rules = (await admin.get("/admin/alerts/rules")).json()["data"]
            tenant_rules = await acme.get("/admin/alerts/rules")
            async with client_for(app) as nobody:
                anonymous = await nobody.get("/admin/alerts")
    events = {(e["event"], e["destination"]) for e in everything}
    assert {("fired", None), ("delivered", "ops"), ("delivered", "acme")} <= events
    assert [a["fingerprint"] for a in active] == ["errors:acme"]
    # A tenant sees deliveries to its own webhook, never the operator's.
    assert {e["destination"] for e in own["data"]} == {"acme"}
    assert all(e["tenant"] == "acme" for e in own["data"])
    # Another tenant sees none of it, and asking for acme's is a 404, not a 403.
    assert others == []
    assert hobby_active == []
    assert peeking.status_code == 404
    assert bad_event.status_code == 400
    assert bad_event.json()["error"]["param"] == "event"
    assert anonymous.status_code == 401
    assert [(r["id"], r["kind"], r["threshold"]) for r in rules] == [("errors", "error_rate", 0.5)]
    assert tenant_rules.status_code == 403


async def test_alert_rules_replaced_through_the_admin_api_take_effect() -> None:
    from tenantware import KeyHasher

    admin_key = "sk-test-alert-admin"
    quiet = {**FAST_ERRORS, "threshold": 1.0}  # an error rate can never be over 100 %
    with receiver() as (hooks, url):
        config = alert_config(
            url,
            [quiet],
            breaker={"enabled": False},
            gateway={"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(admin_key)}]},
        )
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with (
            gateway.running(),
            client_for(app, KEYS["acme"]) as acme,
            client_for(app, admin_key) as admin,
        ):
            await _send(acme, 5)
            await anyio.sleep(0.3)  # judged several times: nothing fires at 100 %
            assert hooks.delivered("/acme", "firing") == []
            by_tenant = await acme.put("/admin/alerts/rules", json={"data": [FAST_ERRORS]})
            unknown = await admin.put(
                "/admin/alerts/rules",
                json={"data": [{**FAST_ERRORS, "scope": "tenant", "match": ["nobody"]}]},
            )
            malformed = await admin.put("/admin/alerts/rules", json={"data": [{"id": "x"}]})
            changed = await admin.put("/admin/alerts/rules", json={"data": [FAST_ERRORS]})
            await repeat_until(lambda: hooks.delivered("/acme", "firing"), lambda: _send(acme, 1))
            rules = (await admin.get("/admin/alerts/rules")).json()["data"]
    assert by_tenant.status_code == 403
    assert unknown.status_code == 400
    assert "nobody" in unknown.json()["error"]["message"]
    assert malformed.status_code == 400
    assert changed.status_code == 200, changed.text
    assert [(r["id"], r["threshold"]) for r in rules] == [("errors", 0.5)]
    assert hooks.delivered("/acme", "firing")[0]["alert"]["rule"] == "errors"


async def test_a_tenant_registers_its_own_webhook_for_its_own_alerts() -> None:
    with receiver() as (hooks, url):
        config = alert_config(
            url,
            [FAST_ERRORS],
            breaker={"enabled": False},
            alerts={"tenant_webhooks": True, "allow_private_webhook_urls": True},
        )
        gateway, fake = in_process_gateway(config=config)
        fake.config.failure_rate = 1.0
        app = gateway.asgi_app()
        async with (
            gateway.running(),
            client_for(app, KEYS["acme"]) as acme,
            client_for(app, KEYS["hobby"]) as hobby,
        ):
            made = await acme.post("/admin/tenants/acme/webhooks", json={"url": f"{url}/mine"})
            theirs = await hobby.post(
                "/admin/tenants/hobby/webhooks", json={"url": f"{url}/theirs"}
            )
            sneaky = await hobby.post("/admin/tenants/acme/webhooks", json={"url": f"{url}/sneaky"})
            peek = await hobby.get("/admin/tenants/acme/webhooks")
            listed = (await acme.get("/admin/tenants/acme/webhooks")).json()["data"]
            # Delivery to a registered webhook starts at the next evaluation.
            engine = gateway.alerts
            assert engine is not None
            await wait_until(
                lambda: (
                    engine.dispatcher is not None and made.json()["id"] in engine.dispatcher.lanes
                )
            )
            await _send(acme, 5)
            await wait_until(lambda: hooks.delivered("/mine", "firing"))
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            removed = await acme.delete(f"/admin/tenants/acme/webhooks/{made.json()['id']}")
            again = await acme.delete(f"/admin/tenants/acme/webhooks/{made.json()['id']}")
    assert made.status_code == 201
    secret = made.json()["secret"]
    assert secret.startswith("whsec_")
    assert theirs.status_code == 201
    assert sneaky.status_code == 404
    assert peek.status_code == 404
    assert [w["url"] for w in listed] == [f"{url}/mine"]
    assert "secret" not in listed[0]
    (hit,) = [h for h in hooks.at("/mine") if h.json()["status"] == "firing"]
    assert hit.json()["alert"]["tenant"] == "acme"
    assert verify_signature(secret.encode(), hit.body, hit.headers["tenantware-signature"])
    assert hooks.at("/theirs") == []
    assert removed.status_code == 200
    assert again.status_code == 404


async def test_a_registered_webhook_may_not_point_inside_the_network() -> None:
    config = alert_config(
        "http://127.0.0.1:9", [FAST_ERRORS], alerts={"destinations": [], "tenant_webhooks": True}
    )
    gateway, _ = in_process_gateway(config=config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
        refused = [
            await acme.post("/admin/tenants/acme/webhooks", json={"url": target})
            for target in (
                "http://127.0.0.1:6379/",
                "http://10.0.0.8/hook",
                "http://[::1]/hook",
                "http://localhost/hook",
                "http://169.254.169.254/latest",
                "ftp://example.com/hook",
                "https://user:pw@example.com/hook",
            )
        ]
        accepted = await acme.post(
            "/admin/tenants/acme/webhooks", json={"url": "https://hooks.example.com/a"}
        )
    for answer in refused:
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "url"
    assert accepted.status_code == 201


async def test_an_unreachable_alert_store_is_a_store_failover_of_this_replica() -> None:
    from tenantware.alerts import AlertEngine
    from tenantware.alerts.redis import RedisAlertStore
    from tenantware.backends.errors import StoreUnavailable
    from tenantware.backends.redis_support import connect_redis
    from tenantware.state import LiveConfig
    from tests.servers import find_free_port

    rules = [{"id": "store", "kind": "store_failover", "threshold": 0}, FAST_ERRORS]
    with receiver() as (hooks, url):
        live = LiveConfig(alert_config(url, rules))
        # Nothing listens there: every call is refused, as when Redis is down.
        client = connect_redis(f"redis://127.0.0.1:{find_free_port()}/0", timeout_s=0.25)
        engine = AlertEngine(live, RedisAlertStore(client), replica="r2")
        engine.observe([_record(outcome="upstream_error", ts=1.0e9)])
        async with engine.running():
            await wait_until(lambda: hooks.delivered("/ops", "firing"))
            # The admin API answers 503 for the history meanwhile.
            with pytest.raises(StoreUnavailable):
                await engine.history(limit=10)
        await client.aclose()
    alert = hooks.delivered("/ops", "firing")[0]["alert"]
    assert alert["fingerprint"] == "store:r2"
    assert alert["kind"] == "store_failover"
