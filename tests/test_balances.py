"""Prepaid balances: reserved with the other limits, credited once, journaled, verified."""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from tenantware import KeyHasher
from tenantware.balances import Balances, HmacTestProvider
from tenantware.config import Limits
from tenantware.metering.ledger import JournalEntry, MemoryLedger, UsageRecord, open_ledger
from tenantware.metering.ledger.base import LedgerRejected
from tenantware.quota import build_plan
from tests.quota_support import Clock, make_store
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config, tenant_entries

pytestmark = pytest.mark.anyio

ADMIN = "sk-test-admin"
PAY_SECRET = "whsec-test-123"


def prepaid_config(*, low: str | None = "0.001", ledger: str = "memory://", **over: Any) -> Any:
    tenants = tenant_entries()
    tenants[0] = {**tenants[0], "billing": "prepaid", "low_balance_usd": low}
    tenants[1] = {**tenants[1], "billing": "prepaid"}
    gateway = {
        "admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}],
        "payment_webhooks": {"test": {"secret_env": "TW_TEST_PAY_SECRET"}},
        **over.pop("gateway", {}),
    }
    return make_config(
        tenants=tenants,
        gateway=gateway,
        metering={"ledger_url": ledger, "request_log": False},
        **over,
    )


@pytest.fixture(autouse=True)
def _payment_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TW_TEST_PAY_SECRET", PAY_SECRET)


# -- the store: a balance is one more limit of the plan --------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_store_reserves_settles_and_credits_once(
    kind: str, redis_url: str, redis_prefix: str
) -> None:
    store, client = make_store(
        kind, Clock() if kind == "memory" else None, redis_url=redis_url, prefix=redis_prefix
    )
    plan, _ = build_plan(
        make_config(), "acme", Limits(requests_per_minute=1000), None, redis_prefix, balance_low=300
    )
    assert plan is not None
    at = plan.balance_index
    assert at >= 0
    refused = await store.reserve(plan, 10, 100, "t0", charge=100)
    assert (refused.allowed, refused.failed) == (False, at)  # nothing credited yet
    assert await store.balance("acme") is None
    assert await store.credit("acme", "e1", 1000, 300) == 1000
    assert await store.credit("acme", "e1", 1000, 300) == 1000  # the same entry: once
    first = await store.reserve(plan, 10, 100, "t1", charge=600)
    assert (first.allowed, first.remaining[at], first.reset_us[at]) == (True, 400, 0)
    crossing = await store.reserve(plan, 10, 100, "t2", charge=200)
    assert (crossing.remaining[at], crossing.reset_us[at]) == (200, 1)  # below 300: warn
    below = await store.reserve(plan, 10, 100, "t3", charge=100)
    assert (below.remaining[at], below.reset_us[at]) == (100, 0)  # warned once per crossing
    too_big = await store.reserve(plan, 10, 100, "t4", charge=150)
    assert (too_big.allowed, too_big.failed) == (False, at)
    # The first request cost 500, not 600: 100 back.
    await store.settle(plan, first.now_us, "t1", 0, -100, charge_delta=-100)
    assert await store.balance("acme") == 200
    assert (await store.usage(plan))[at] == 200
    # A credit above the threshold re-arms the warning.
    assert await store.credit("acme", "e2", 500, 300) == 700
    again = await store.reserve(plan, 10, 100, "t5", charge=500)
    assert (again.remaining[at], again.reset_us[at]) == (200, 1)
    # Cancel gives the whole charge back.
    await store.settle(plan, again.now_us, "t5", -10, -100, cancel=True, charge_delta=-500)
    assert await store.balance("acme") == 700
    assert not await store.restore("acme", 5, [])
    assert await store.restore("other", 42, ["x"])
    assert await store.credit("other", "x", 1000, 0) == 42  # restored entries are applied
    if client is not None:
        await client.aclose()


# -- through the gateway ---------------------------------------------------------------------


async def test_prepaid_requests_stop_at_zero_and_balance_matches_ledger() -> None:
    gateway, _ = in_process_gateway(config=prepaid_config(low="0.002"))
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        async with client_for(app, KEYS["acme"]) as acme:
            unpaid = await acme.post("/v1/chat/completions", json={**CHAT, "max_tokens": 50})
            assert unpaid.status_code == 429
            assert unpaid.json()["error"]["code"] == "insufficient_quota"
            assert unpaid.json()["error"]["type"] == "insufficient_quota"
            assert unpaid.headers["x-should-retry"] == "false"
            topped = await admin.post(
                "/admin/tenants/acme/balance/topups",
                json={"amount_usd": "0.005"},
                headers={"idempotency-key": "first"},
            )
            assert topped.status_code == 201, topped.text
            served = 0
            low_headers: list[str] = []
            with structlog.testing.capture_logs() as logs:
                for _ in range(1000):
                    answer = await acme.post(
                        "/v1/chat/completions", json={**CHAT, "max_tokens": 50}
                    )
                    if answer.status_code != 200:
                        break
                    served += 1
                    if "x-tenantware-balance-low" in answer.headers:
                        low_headers.append(answer.headers["x-tenantware-balance-low"])
            assert answer.status_code == 429, answer.text
            assert answer.json()["error"]["code"] == "insufficient_quota"
            assert answer.headers["x-should-retry"] == "false"
            assert served > 10
            assert low_headers  # the last requests were served below 0.002 USD
            crossings = [e for e in logs if e["event"] == "prepaid balance below its threshold"]
            assert len(crossings) == 1
        assert gateway.writer is not None
        await gateway.writer.flush()
        ledger = gateway.ledger
        assert isinstance(ledger, MemoryLedger)
        records = [r for r in await ledger.query(tenant="acme") if r.outcome == "ok"]
        assert len(records) == served
        billed = sum(r.charged_nanousd for r in records)
        assert sum(r.balance_debit_nanousd for r in records) == billed
        balance = await admin.get("/admin/tenants/acme/balance")
        assert balance.json()["balance_nanousd"] == 5_000_000 - billed
        assert balance.json()["low"] is True
        from tenantware import metrics

        sample = metrics.REGISTRY.get_sample_value
        assert sample("tenantware_balance_low", {"tenant": "acme"}) == 1
        last_seen = sample("tenantware_balance_nanousd", {"tenant": "acme"})
        assert last_seen is not None
        assert 0 <= last_seen < 2_000_000
        assert gateway.balances is not None
        standing = await gateway.balances.standing("acme", 2_000_000)
        assert (standing.balance_nanousd, standing.low) == (5_000_000 - billed, True)
        verified = await admin.get("/admin/balances/verify")
        assert verified.json()["ok"] is True, verified.text
        journal = await admin.get("/admin/tenants/acme/balance/journal?limit=1000")
        kinds = [e["kind"] for e in journal.json()["data"]]
        assert kinds.count("debit") == served
        assert kinds.count("topup") == 1


async def test_topup_is_idempotent_and_refuses_another_body() -> None:
    config = prepaid_config()
    metering = msgspec.structs.replace(
        config.metering, currency="EUR", currency_per_usd=Decimal("0.92")
    )
    gateway, _ = in_process_gateway(config=msgspec.structs.replace(config, metering=metering))
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        path = "/admin/tenants/acme/balance/topups"
        headers = {"idempotency-key": "order-17"}
        first = await admin.post(path, json={"amount_usd": "2.50"}, headers=headers)
        again = await admin.post(path, json={"amount_usd": "2.50"}, headers=headers)
        assert first.status_code == again.status_code == 201
        assert first.json() == again.json()
        assert first.json()["amount_nanousd"] == 2_500_000_000
        assert again.headers["idempotent-replayed"] == "true"
        other = await admin.post(path, json={"amount_usd": "3"}, headers=headers)
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert other.json()["error"]["param"] == "Idempotency-Key"
        # The same key for another tenant is another top-up.
        hobby = await admin.post(
            "/admin/tenants/hobby/balance/topups", json={"amount_usd": "1"}, headers=headers
        )
        assert hobby.status_code == 201
        missing = await admin.post(path, json={"amount_usd": "1"})
        assert (missing.status_code, missing.json()["error"]["param"]) == (400, "Idempotency-Key")
        for bad in ("0", "-1", "1e7", "0.0000000001", "NaN"):
            refused = await admin.post(
                path, content=json.dumps({"amount_usd": bad}), headers={"idempotency-key": bad}
            )
            assert refused.status_code == 400, (bad, refused.text)
            assert refused.json()["error"]["param"] == "amount_usd"
        unknown = await admin.post(
            "/admin/tenants/nobody/balance/topups", json={"amount_usd": "1"}, headers=headers
        )
        assert unknown.status_code == 404
        shown = await admin.get("/admin/tenants/acme/balance")
        assert shown.json()["balance_nanousd"] == 2_500_000_000
        assert shown.json()["balance_usd"] == "2.5"
        assert (shown.json()["currency"], shown.json()["balance_in_currency"]) == (
            "EUR",
            "2.300000",
        )
        async with client_for(app, KEYS["acme"]) as acme:
            assert (await acme.get("/admin/tenants/acme/balance")).status_code == 200
            assert (await acme.get("/admin/tenants/hobby/balance")).status_code == 404
            own = await acme.post(path, json={"amount_usd": "9"}, headers={"idempotency-key": "x"})
            assert own.status_code == 403  # a tenant does not top itself up
        audit = await admin.get("/admin/audit?action=balance.credit")
        assert len(audit.json()["data"]) == 2  # replays are not audited again
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is True
        # Money that reached the store without the journal is found.
        await gateway.quota_store.credit("acme", "rogue", 7, 0)
        checked = (await admin.get("/admin/balances/verify")).json()
        assert checked["ok"] is False
        acme_check = next(c for c in checked["data"] if c["tenant"] == "acme")
        assert acme_check["store_nanousd"] - acme_check["journal_nanousd"] == 7


async def test_redemption_codes_redeem_once() -> None:
    gateway, _ = in_process_gateway(config=prepaid_config())
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        made = await admin.post("/admin/redemption-codes", json={"count": 3, "amount_usd": "1"})
        assert made.status_code == 201, made.text
        codes = made.json()["codes"]
        assert len(set(codes)) == 3
        async with client_for(app, KEYS["hobby"]) as hobby, client_for(app, KEYS["acme"]) as acme:
            first = await hobby.post("/admin/tenants/hobby/balance/redeem", json={"code": codes[0]})
            assert first.status_code == 201, first.text
            retry = await hobby.post("/admin/tenants/hobby/balance/redeem", json={"code": codes[0]})
            assert retry.json() == first.json()
            stolen = await acme.post("/admin/tenants/acme/balance/redeem", json={"code": codes[0]})
            assert stolen.status_code == 409
            assert stolen.json()["error"]["code"] == "code_unusable"
            other = await acme.post("/admin/tenants/hobby/balance/redeem", json={"code": codes[1]})
            assert other.status_code == 404  # another tenant's balance
            bogus = await acme.post("/admin/tenants/acme/balance/redeem", json={"code": "twc-x"})
            assert (bogus.status_code, bogus.json()["error"]["param"]) == (409, "code")
        listed = await admin.get("/admin/tenants/hobby/balance")
        assert listed.json()["balance_nanousd"] == 1_000_000_000
        mine = await admin.post(
            "/admin/redemption-codes",
            json={"count": 1, "amount_usd": "1", "tenant_id": "acme"},
        )
        async with client_for(app, KEYS["hobby"]) as hobby:
            refused = await hobby.post(
                "/admin/tenants/hobby/balance/redeem", json={"code": mine.json()["codes"][0]}
            )
            assert refused.status_code == 409
        audit = await admin.get("/admin/audit?action=redemption_codes.create")
        for code in codes:
            assert code not in audit.text


async def test_payment_webhook_credits_each_event_once() -> None:
    gateway, _ = in_process_gateway(config=prepaid_config())
    app = gateway.asgi_app()
    provider = HmacTestProvider(PAY_SECRET.encode())
    event = {"id": "evt_1", "type": "payment.succeeded", "tenant": "acme", "amount_usd": "5"}
    body = json.dumps(event).encode()
    async with gateway.running(), client_for(app) as anyone, client_for(app, ADMIN) as admin:
        signed = {"tw-signature": provider.sign(body), "content-type": "application/json"}
        first = await anyone.post("/admin/payments/test", content=body, headers=signed)
        assert first.status_code == 200, first.text
        assert first.json()["credited"] is True
        replay = await anyone.post("/admin/payments/test", content=body, headers=signed)
        assert replay.json() == first.json()
        balance = await admin.get("/admin/tenants/acme/balance")
        assert balance.json()["balance_nanousd"] == 5_000_000_000
        forged = await anyone.post(
            "/admin/payments/test",
            content=body.replace(b'"5"', b'"500"'),
            headers=signed,
        )
        assert forged.status_code == 400
        old = {"tw-signature": provider.sign(body, at=time.time() - 3600)}
        assert (
            await anyone.post("/admin/payments/test", content=body, headers=old)
        ).status_code == 400
        changed = json.dumps({**event, "amount_usd": "6"}).encode()
        reused = await anyone.post(
            "/admin/payments/test",
            content=changed,
            headers={"tw-signature": provider.sign(changed)},
        )
        assert reused.status_code == 409
        refund = json.dumps({**event, "id": "evt_2", "type": "charge.refunded"}).encode()
        ignored = await anyone.post(
            "/admin/payments/test", content=refund, headers={"tw-signature": provider.sign(refund)}
        )
        assert (ignored.status_code, ignored.json()["credited"]) == (200, False)
        nobody = json.dumps({**event, "id": "evt_3", "tenant": "ghost"}).encode()
        unknown = await anyone.post(
            "/admin/payments/test", content=nobody, headers={"tw-signature": provider.sign(nobody)}
        )
        assert unknown.status_code == 422
        assert (await anyone.post("/admin/payments/other", content=body)).status_code == 404


# -- the journal in the SQL ledgers ------------------------------------------------------------


def _entry(reference: str, amount: int = 100, tenant: str = "acme") -> JournalEntry:
    return JournalEntry(
        id=f"bal_{reference}",
        tenant_id=tenant,
        at=time.time(),
        kind="topup",
        amount_nanousd=amount,
        reference=reference,
        fingerprint="f",
    )


async def _journal_behaviour(ledger: Any) -> None:
    await ledger.open()
    stored = await ledger.append(_entry("r1"))
    assert stored.id == "bal_r1"
    again = await ledger.append(msgspec.structs.replace(_entry("r1", 999), id="bal_other"))
    assert again == stored  # the first one, whoever asks
    record = UsageRecord(record_id="rec1", request_id="q", ts=time.time(), tenant="acme")
    paid = msgspec.structs.replace(record, record_id="rec2", balance_debit_nanousd=30)
    await ledger.write([record, paid])
    await ledger.write([paid])  # a batch written again: no second debit
    assert await ledger.totals() == {"acme": 70}
    assert await ledger.credit_ids("acme") == ["bal_r1"]
    kinds = [e.kind for e in await ledger.entries("acme")]
    assert sorted(kinds) == ["debit", "topup"]
    await ledger.aclose()


async def test_sqlite_journal(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _journal_behaviour(open_ledger(f"sqlite:///{path}"))
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError, match="append"):
        conn.execute("UPDATE balance_journal SET amount_nanousd = 1")
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError, match="append"):
        conn.execute("DELETE FROM balance_journal")


async def test_postgres_journal(postgres_url: str, postgres_schema: str) -> None:
    import psycopg

    ledger = open_ledger(f"{postgres_url}?schema={postgres_schema}")
    await _journal_behaviour(ledger)
    with psycopg.connect(postgres_url) as conn, pytest.raises(psycopg.Error, match="append"):
        conn.execute(f"DELETE FROM {postgres_schema}.balance_journal")


async def test_memory_ledger_codes_refuse_duplicates() -> None:
    ledger = MemoryLedger()
    balances = Balances(make_store("memory", Clock())[0], ledger)
    _, codes = await balances.create_codes(2, 10, actor="admin:ops")
    with pytest.raises(LedgerRejected):
        await ledger.add_codes(list(ledger.codes.values()))
    assert len(codes) == 2


async def test_balance_survives_a_restart_on_the_memory_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    gateway, _ = in_process_gateway(config=prepaid_config(ledger=url))
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        topped = await admin.post(
            "/admin/tenants/acme/balance/topups",
            json={"amount_usd": "1"},
            headers={"idempotency-key": "k"},
        )
        assert topped.status_code == 201
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
            assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        before = (await admin.get("/admin/tenants/acme/balance")).json()["balance_nanousd"]
    restarted, _ = in_process_gateway(config=prepaid_config(ledger=url))
    async with restarted.running(), client_for(restarted.asgi_app(), ADMIN) as admin:
        after = (await admin.get("/admin/tenants/acme/balance")).json()["balance_nanousd"]
        assert after == before < 1_000_000_000
        again = await admin.post(
            "/admin/tenants/acme/balance/topups",
            json={"amount_usd": "1"},
            headers={"idempotency-key": "k"},
        )
        assert again.headers["idempotent-replayed"] == "true"
        shown = await admin.get("/admin/tenants/acme/balance")
        assert shown.json()["balance_nanousd"] == before  # the replay credited nothing
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is True


async def test_a_balance_goes_below_zero_by_at_most_one_requests_estimation_error() -> None:
    """The upstream reports 40 more prompt tokens than the gateway estimated: each request
    costs more than it reserved, so the balance can end below zero, by at most that error."""
    from tenantware import get_context
    from tenantware.context import Usage
    from tenantware.metering.pricing import cost_nanousd

    gateway, _ = in_process_gateway(config=prepaid_config(low=None))
    price = gateway.live.current.catalogue.price("gpt-4.1")
    assert price is not None
    errors: list[int] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        ctx = get_context(scope)
        await receive()
        estimated = ctx.estimated_prompt_tokens
        ctx.usage = Usage(input_tokens=estimated + 40, output_tokens=20)
        errors.append(cost_nanousd(price, estimated + 40, 20) - cost_nanousd(price, estimated, 20))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = gateway.wrap(inner)
    body = {**CHAT, "max_tokens": 20}
    assert gateway.balances is not None
    async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
        await gateway.balances.credit(
            tenant_id="acme",
            kind="topup",
            amount_nanousd=10_000_000,
            reference="bound",
            fingerprint="",
            actor="test",
        )
        assert (await acme.post("/v1/chat/completions", json=body)).status_code == 200
        left = await gateway.balances.balance("acme")
        assert left is not None
        actual = 10_000_000 - left
        estimated = actual - errors[0]
        # Top up so that the balance is k requests' actual cost plus one estimate: the last
        # request is granted on its estimate and costs more.
        await gateway.balances.credit(
            tenant_id="acme",
            kind="topup",
            amount_nanousd=(estimated - left) % actual + actual,
            reference="bound-2",
            fingerprint="",
            actor="test",
        )
        lowest = 10_000_000
        for _ in range(1000):
            if (await acme.post("/v1/chat/completions", json=body)).status_code != 200:
                break
            balance = await gateway.balances.balance("acme")
            assert balance is not None
            lowest = min(lowest, balance)
        assert len(errors) > 5
        assert errors[0] > 0
        assert lowest < 0  # the last request was served and cost more than it reserved
        assert lowest >= -max(errors)


def test_cli_tops_up_idempotently_and_verifies(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tenantware.cli import main
    from tenantware.testing.serve import serve_in_thread

    gateway, _ = in_process_gateway(config=prepaid_config())
    with serve_in_thread(gateway.asgi_app()) as url:
        monkeypatch.setenv("TENANTWARE_URL", url)
        monkeypatch.setenv("TENANTWARE_ADMIN_KEY", ADMIN)
        topup = ["balances", "topup", "acme", "2.5", "--idempotency-key", "inv-1"]
        assert main(topup) == 0
        first = json.loads(capsys.readouterr().out)
        assert main(topup) == 0
        assert json.loads(capsys.readouterr().out) == first
        assert main([*topup[:3], "3", *topup[4:]]) == 1
        assert "409" in capsys.readouterr().err
        assert main(["balances", "show", "acme"]) == 0
        assert json.loads(capsys.readouterr().out)["balance_nanousd"] == 2_500_000_000
        assert main(["balances", "verify"]) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True
        assert main(["balances", "codes", "2", "1.5"]) == 0
        codes = json.loads(capsys.readouterr().out)["codes"]
        assert main(["balances", "redeem", "hobby", codes[0]]) == 0
        assert json.loads(capsys.readouterr().out)["amount_nanousd"] == 1_500_000_000
        assert main(["balances", "journal", "hobby"]) == 0
        assert [e["kind"] for e in json.loads(capsys.readouterr().out)["data"]] == ["redemption"]


async def test_the_balance_is_checked_with_quotas_off() -> None:
    gateway, _ = in_process_gateway(config=prepaid_config(quota={"enabled": False}))
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, KEYS["acme"]) as acme:
        refused = await acme.post("/v1/chat/completions", json=CHAT)
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert gateway.balances is not None
        await gateway.balances.credit(
            tenant_id="acme",
            kind="topup",
            amount_nanousd=1_000_000_000,
            reference="r",
            fingerprint="",
            actor="test",
        )
        assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        left = await gateway.balances.balance("acme")
        assert left is not None
        assert 0 < left < 1_000_000_000


async def test_a_store_outage_refuses_prepaid_requests_whatever_the_policy() -> None:
    from tests.servers import find_free_port

    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    config = prepaid_config(gateway={"redis_url": dead, "on_store_failure": "open"})
    gateway, fake = in_process_gateway(config=config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
        for _ in range(3):
            answer = await acme.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "quota_unavailable"
    assert fake.stats.requests == 0  # nothing was served unpaid


async def test_billing_fields_of_a_tenant_are_validated() -> None:
    gateway, _ = in_process_gateway(config=prepaid_config())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        for body, param in (
            ({"id": "x", "billing": "credit"}, "billing"),
            ({"id": "x", "low_balance_usd": "-1"}, "low_balance_usd"),
        ):
            refused = await admin.post("/admin/tenants", json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param
        made = await admin.post("/admin/tenants", json={"id": "x", "billing": "prepaid"})
        assert made.json()["billing"] == "prepaid"
        patched = await admin.patch("/admin/tenants/x", json={"low_balance_usd": "2.5"})
        assert patched.json()["low_balance_usd"] == "2.5"


async def test_a_credit_cut_between_journal_and_store_completes_once_on_retry(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The journal took the top-up, the store was unreachable: a retry on another replica
    (after that replica restored the balance from the journal) credits it once."""
    from tests.servers import find_free_port

    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    request = {
        "url": "/admin/tenants/acme/balance/topups",
        "json": {"amount_usd": "4"},
        "headers": {"idempotency-key": "cut"},
    }
    cut_off, _ = in_process_gateway(
        config=prepaid_config(ledger=ledger, gateway={"redis_url": dead, "redis_prefix": "x:"})
    )
    async with cut_off.running(), client_for(cut_off.asgi_app(), ADMIN) as admin:
        failed = await admin.post(**request)
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["code"] == "balance_store_unavailable"
    config = prepaid_config(
        ledger=ledger, gateway={"redis_url": redis_url, "redis_prefix": redis_prefix}
    )
    replica, _ = in_process_gateway(config=config)
    async with replica.running(), client_for(replica.asgi_app(), ADMIN) as admin:
        retried = await admin.post(**request)
        assert retried.status_code == 201, retried.text
        assert retried.headers["idempotent-replayed"] == "true"
        again = await admin.post(**request)
        assert again.json() == retried.json()
        shown = await admin.get("/admin/tenants/acme/balance")
        assert shown.json()["balance_nanousd"] == 4_000_000_000
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is True


# -- repair: the store set back to the journal --------------------------------------------------


async def test_reconcile_sets_a_redis_balance_back_to_its_journal_once_and_audits_it(
    redis_url: str, redis_prefix: str
) -> None:
    import redis.asyncio as aioredis

    config = prepaid_config(gateway={"redis_url": redis_url, "redis_prefix": redis_prefix})
    gateway, _ = in_process_gateway(config=config)
    app = gateway.asgi_app()
    raw = aioredis.from_url(redis_url)
    try:
        await _repairs(gateway, app, config, raw, redis_prefix)
    finally:
        await raw.aclose()


async def _repairs(gateway: Any, app: Any, config: Any, raw: Any, redis_prefix: str) -> None:
    from tenantware.quota.plan import balance_key

    async with gateway.running(), client_for(app, ADMIN) as admin:
        balances = gateway.balances
        assert balances is not None
        store, journal = balances.store, balances.journal
        headers = {"Idempotency-Key": "repair-1"}
        path = "/admin/tenants/acme/balance/topups"
        assert (await admin.post(path, json={"amount_usd": "1"}, headers=headers)).is_success
        reconcile = "/admin/tenants/acme/balance/reconcile"
        agreed = await admin.post(reconcile)
        assert (agreed.status_code, agreed.json()["correction_nanousd"]) == (200, 0)

        # 1. A credit the journal took whose store write never happened.
        lost = JournalEntry(
            id="bal_lost", tenant_id="acme", at=time.time(), kind="topup",
            amount_nanousd=500, reference="topup:acme:lost", actor="admin:ops",
        )  # fmt: skip
        await journal.append(lost)
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is False
        repaired = await admin.post(reconcile)
        assert repaired.status_code == 200
        assert repaired.json() == {
            "object": "balance.reconcile",
            "tenant": "acme",
            "journal_nanousd": 1_000_000_500,
            "before_nanousd": 1_000_000_000,
            "after_nanousd": 1_000_000_500,
            "correction_nanousd": 500,
            "ok": True,
        }
        again = await admin.post(reconcile)  # idempotent: nothing left to repair
        assert (again.json()["correction_nanousd"], again.json()["ok"]) == (0, True)
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is True
        # The same difference repaired twice at once (two operators, two replicas): once.
        await journal.append(msgspec.structs.replace(lost, id="bal_lost2", reference="r2"))
        twice = [await balances.reconcile("acme"), await _stale_reconcile(balances, "acme")]
        assert [r.correction_nanousd for r in twice] == [500, 500]
        assert twice[0].entry_id == twice[1].entry_id
        assert await store.balance("acme") == 1_000_001_000

        # 2. Redis lost the balance while a request was in flight; its settle (a refund)
        # wrote a fresh balance, so the start-up restore no longer applies.
        plan, _ = build_plan(config, "acme", Limits(), None, redis_prefix, balance_low=0)
        assert plan is not None
        held = await store.reserve(plan, 10, 1000, "t-flush", charge=1000)
        assert held.allowed
        key = balance_key(redis_prefix, "acme")
        await raw.delete(key, key + ":credited")
        await store.settle(plan, held.now_us, "t-flush", 0, -400, charge_delta=-400)
        debit = JournalEntry(
            id="bal_debit", tenant_id="acme", at=time.time(), kind="debit",
            amount_nanousd=-600, reference="debit:t-flush",
        )  # fmt: skip
        await journal.append(debit)
        assert await balances.restore() == []
        assert await store.balance("acme") == 400
        restored = await admin.post(reconcile)
        assert restored.json()["before_nanousd"] == 400
        assert restored.json()["after_nanousd"] == 1_000_000_400 == await store.balance("acme")
        assert (await admin.get("/admin/balances/verify")).json()["ok"] is True
        # A later credit of an entry the journal held before the flush still applies once.
        assert await store.credit("acme", "bal_lost", 500, 0) == 1_000_000_400

        # 3. A balance the store lost entirely is restored whole (with its credited ids).
        await raw.delete(key, key + ":credited")
        whole = await admin.post(reconcile)
        assert (whole.json()["before_nanousd"], whole.json()["ok"]) == (None, True)
        assert await store.credit("acme", "bal_lost", 500, 0) == 1_000_000_400

        audit = (await admin.get("/admin/audit?action=balance.reconcile")).json()["data"]
        assert len(audit) == 3
        assert {entry["actor"] for entry in audit} == {"admin:ops"}
        acme = client_for(app, KEYS["acme"])
        async with acme:
            assert (await acme.post(reconcile)).status_code == 403


async def _stale_reconcile(balances: Balances, tenant_id: str) -> Any:
    """A second repair that read the store before the first one credited it."""
    from tenantware.balances import Reconciled

    store = balances.store
    real = store.balance
    stale = await real(tenant_id)
    assert stale is not None

    async def before(_tenant: str) -> int | None:
        return stale - 500

    store.balance = before  # type: ignore[method-assign]
    try:
        done: Reconciled = await balances.reconcile(tenant_id)
    finally:
        del store.balance
    return done
