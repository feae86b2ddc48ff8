"""Per-tenant policy: own upstream keys, aliases, allowed upstreams, fallbacks, timeout, flags."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient, KeyHasher, get_context
from tenantware.backends.sealed import new_secrets_key
from tenantware.metering.ledger import MemoryLedger
from tenantware.testing.upstream import FakeUpstream
from tests.support import CHAT, KEYS, client_for, make_config, tenant_entries

pytestmark = pytest.mark.anyio

ADMIN = "sk-test-admin"
OWN_KEY = "sk-acme-own-key-7f3a"
GATEWAY_KEY = "sk-gateway-key-0000"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTWARE_SECRETS_KEY", new_secrets_key())
    monkeypatch.setenv("TW_TEST_UPSTREAM_KEY", GATEWAY_KEY)


class Recorder:
    """The fake upstream behind a tap that notes each request's authorization header."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        #: ``(x-request-id, authorization, host)`` per chat request.
        self.seen: list[tuple[str, str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode()
            host = headers.get(b"host", b"").decode()
            self.seen.append((headers.get(b"x-request-id", b"").decode(), auth, host))
        await self.fake(scope, receive, send)


def policy_config(*, prepaid: bool = False, **over: Any) -> Any:
    tenants = tenant_entries()
    billing = "prepaid" if prepaid else "postpaid"
    tenants[0] = {**tenants[0], "billing": billing, "policy": over.pop("policy", {})}
    tenants[1] = {**tenants[1], "policy": {"self_service": True}}
    return make_config(
        tenants=tenants,
        upstreams=[
            {
                "name": "fake",
                "base_url": "http://upstream.test/v1",
                "api_key_env": "TW_TEST_UPSTREAM_KEY",
                "models": ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash"],
            },
            {"name": "spare", "base_url": "http://spare.test/v1", "models": ["gpt-4.1"]},
        ],
        tiers={"enterprise": {"flags": {"beta": True, "audit_export": False}}},
        gateway={"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}]},
        **over,
    )


def gateway_for(config: Any) -> tuple[Gateway, Recorder]:
    recorder = Recorder(FakeUpstream())
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=recorder))
    return Gateway(config, upstream_client=client), recorder


async def test_own_key_reaches_the_upstream_and_is_not_charged() -> None:
    gateway, recorder = gateway_for(policy_config(prepaid=True))
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        put = await admin.put("/admin/tenants/acme/upstream-keys/fake", json={"key": OWN_KEY})
        assert put.status_code == 201, put.text
        assert put.json()["hint"] == OWN_KEY[-4:]
        assert OWN_KEY not in put.text
        topped = await admin.post(
            "/admin/tenants/acme/balance/topups",
            json={"amount_usd": "1"},
            headers={"idempotency-key": "k"},
        )
        assert topped.status_code == 201
        async with client_for(app, KEYS["acme"]) as acme, client_for(app, KEYS["hobby"]) as hobby:
            for _ in range(3):
                # claude-sonnet-4.5 is served by ``fake`` only, where acme has its own key.
                claude = {**CHAT, "model": "claude-sonnet-4.5"}
                assert (await acme.post("/v1/chat/completions", json=claude)).status_code == 200
                answer = await hobby.post(
                    "/v1/chat/completions", json={**CHAT, "model": "gemini-2.5-flash"}
                )
                assert answer.status_code == 200
        assert gateway.writer is not None
        await gateway.writer.flush()
        ledger = gateway.ledger
        assert isinstance(ledger, MemoryLedger)
        records = {r.request_id: r for r in await ledger.query()}
        own = 0
        for request_id, auth, host in recorder.seen:
            record = records[request_id]
            if record.tenant == "acme" and host == "upstream.test":
                own += 1
                assert auth == f"Bearer {OWN_KEY}"
                assert record.own_upstream_key
                assert record.charged_nanousd == 0 < record.cost_nanousd
            else:
                # Another tenant, or another upstream: never the tenant's key.
                assert auth in ("", f"Bearer {GATEWAY_KEY}")
                assert not record.own_upstream_key
        assert len(recorder.seen) == 6
        assert own == 3
        # Not charged against the balance either: all of the top-up is left.
        balance = await admin.get("/admin/tenants/acme/balance")
        assert balance.json()["balance_nanousd"] == 1_000_000_000
        # Never returned, never in the audit trail, never in the registry in plain.
        policy = await admin.get("/admin/tenants/acme/policy")
        assert policy.json()["upstream_keys"][0]["upstream"] == "fake"
        audit = await admin.get("/admin/audit?tenant=acme")
        record_text = (await gateway.registry_store.get("acme")).tenant.policy  # type: ignore[union-attr]
        for text in (policy.text, audit.text, repr(record_text)):
            assert OWN_KEY not in text
        assert "sealed" not in audit.text
        # Removed: the gateway's key again.
        removed = await admin.delete("/admin/tenants/acme/upstream-keys/fake")
        assert removed.status_code == 200
        async with client_for(app, KEYS["acme"]) as acme:
            claude = {**CHAT, "model": "claude-sonnet-4.5"}
            assert (await acme.post("/v1/chat/completions", json=claude)).status_code == 200
        assert recorder.seen[-1][1] == f"Bearer {GATEWAY_KEY}"


async def test_every_policy_field_is_validated_with_the_field_named() -> None:
    gateway, _ = gateway_for(policy_config())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        path = "/admin/tenants/acme/policy"
        cases = [
            ({"fallbacks": {"gpt-4.1": ["gpt-9"]}}, "fallbacks.gpt-4.1"),
            ({"fallbacks": {"gpt-9": ["gpt-4.1"]}}, "fallbacks.gpt-9"),
            ({"fallbacks": {"gpt-4.1": ["deepseek-v3.2"]}}, "fallbacks.gpt-4.1"),  # not served
            ({"aliases": {"mine": "gpt-9"}}, "aliases.mine"),
            ({"allowed_upstreams": ["nowhere"]}, "allowed_upstreams"),
            ({"timeout_s": 0}, "timeout_s"),
            ({"timeout_s": "soon"}, "timeout_s"),
            ({"flags": {"9lives": True}}, "flags"),
            ({"flags": {"beta": "yes"}}, "flags"),
            ({"colour": "red"}, "colour"),
        ]
        for body, param in cases:
            refused = await admin.patch(path, json=body)
            assert refused.status_code == 400, (body, refused.text)
            assert refused.json()["error"]["param"] == param, (body, refused.text)
        # Fallbacks only to what the allowed upstreams serve.
        narrowed = await admin.patch(
            path,
            json={"allowed_upstreams": ["spare"], "fallbacks": {"gpt-4.1": ["claude-sonnet-4.5"]}},
        )
        assert narrowed.json()["error"]["param"] == "fallbacks.gpt-4.1"
        unknown_upstream = await admin.put(
            "/admin/tenants/acme/upstream-keys/nowhere", json={"key": OWN_KEY}
        )
        assert (unknown_upstream.status_code, unknown_upstream.json()["error"]["param"]) == (
            404,
            "upstream",
        )
        short = await admin.put("/admin/tenants/acme/upstream-keys/fake", json={"key": "x"})
        assert short.json()["error"]["param"] == "key"
        ok = await admin.patch(
            path,
            json={
                "aliases": {"house": "gpt4"},
                "fallbacks": {"gpt-4.1": ["claude-sonnet-4.5"]},
                "timeout_s": 30,
                "flags": {"beta": False, "new_ui": True},
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["effective_flags"] == {
            "beta": False,
            "audit_export": False,
            "new_ui": True,
        }


def test_the_configuration_file_is_checked_the_same_way() -> None:
    from tenantware import ConfigError, load_config  # noqa: F401

    with pytest.raises(Exception, match=r"tenants\[0\]\.policy\.fallbacks\.gpt-4\.1"):
        policy_config(policy={"fallbacks": {"gpt-4.1": ["gpt-9"]}})


async def test_aliases_flags_fallbacks_and_allowed_upstreams_shape_requests() -> None:
    policy = {
        "aliases": {"house": "gpt-4.1"},
        "flags": {"new_ui": True},
        "allowed_upstreams": ["fake"],
        "fallbacks": {"gpt-4.1": ["claude-sonnet-4.5"]},
        "timeout_s": 20,
    }
    config = policy_config(policy=policy)
    gateway, recorder = gateway_for(config)
    flags: list[tuple[bool, bool, bool]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/flags":
            ctx = get_context(scope)
            flags.append((ctx.flag("new_ui"), ctx.flag("beta"), ctx.flag("missing")))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await gateway.proxy(scope, receive, send)

    wrapped = gateway.wrap(app)
    async with gateway.running(), client_for(wrapped, KEYS["acme"]) as acme:
        answer = await acme.post("/v1/chat/completions", json={**CHAT, "model": "house"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "gpt-4.1"
        assert (await acme.get("/v1/flags")).status_code == 204
        # The first upstream fails: the tenant's own chain falls back to another model on
        # its allowed upstream (never to ``spare``, which it may not use).
        recorder.fake.config.fail_next = [500]
        fallen = await acme.post("/v1/chat/completions", json=CHAT)
        assert fallen.status_code == 200, fallen.text
        assert fallen.json()["model"] == "claude-sonnet-4.5"
    assert flags == [(True, True, False)]
    # Every call went to the allowed upstream (``spare`` has no transport: it would fail).
    assert {host for _, _, host in recorder.seen} == {"upstream.test"}


async def test_self_service_where_the_admin_allowed_it() -> None:
    gateway, recorder = gateway_for(policy_config())
    app = gateway.asgi_app()
    async with gateway.running():
        async with client_for(app, KEYS["hobby"]) as hobby:
            mine = await hobby.patch(
                "/admin/tenants/hobby/policy", json={"flags": {"dark": True}, "timeout_s": 5}
            )
            assert mine.status_code == 200, mine.text
            assert mine.json()["flags"] == {"dark": True}
            refused = await hobby.patch(
                "/admin/tenants/hobby/policy", json={"allowed_upstreams": ["fake"]}
            )
            assert (refused.status_code, refused.json()["error"]["param"]) == (
                403,
                "allowed_upstreams",
            )
            assert (
                await hobby.patch("/admin/tenants/hobby/policy", json={"self_service": False})
            ).status_code == 403
            other = await hobby.patch("/admin/tenants/acme/policy", json={"flags": {"x": True}})
            assert other.status_code == 404
            key = await hobby.put("/admin/tenants/hobby/upstream-keys/fake", json={"key": OWN_KEY})
            assert key.status_code == 201
            assert (await hobby.get("/admin/tenants/hobby/policy")).status_code == 200
        async with client_for(app, KEYS["acme"]) as acme:
            assert (await acme.get("/admin/tenants/acme/policy")).status_code == 200
            closed = await acme.patch("/admin/tenants/acme/policy", json={"flags": {"x": True}})
            assert closed.status_code == 403  # self-service is off for acme
        async with client_for(app, ADMIN) as admin:
            audit = await admin.get("/admin/audit?action=policy.update")
            assert [e["actor"] for e in audit.json()["data"]] == ["tenant:hobby-1"] * 2
    assert recorder.seen == []


async def test_a_tenant_timeout_bounds_its_upstream_calls() -> None:
    gateway, recorder = gateway_for(policy_config(policy={"timeout_s": 0.3}))
    recorder.fake.config.latency_s = 30.0  # far beyond the tenant's bound
    claude = {**CHAT, "model": "claude-sonnet-4.5"}
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
        with anyio.fail_after(20):
            answer = await acme.post("/v1/chat/completions", json=claude)
    assert answer.status_code == 504, answer.text
