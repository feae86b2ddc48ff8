"""The admin API on the file registry (one process): tenants and keys changed at run time."""

from __future__ import annotations

from typing import Any

import pytest

from tenantware import KeyHasher
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio

ADMIN = "sk-test-admin"
READER = "sk-test-reader"


def admin_config(**overrides: Any) -> Any:
    hasher = KeyHasher()
    gateway = {
        "admin_keys": [
            {"id": "ops", "hash": hasher.hash(ADMIN)},
            {"id": "auditor", "hash": hasher.hash(READER), "role": "read-only"},
        ],
        **overrides.pop("gateway", {}),
    }
    return make_config(gateway=gateway, **overrides)


def _no_secrets(body: str) -> None:
    assert "sha256:" not in body
    for key in KEYS.values():
        assert key not in body


async def test_create_issue_use_revoke() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        created = await admin.post(
            "/admin/tenants",
            json={"id": "newco", "tier": "pro", "limits": {"requests_per_minute": 5}},
        )
        assert created.status_code == 201, created.text
        assert created.json()["tier"] == "pro"
        effective = created.json()["effective_limits"]
        assert effective["requests_per_minute"] == 5
        assert effective["tokens_per_minute"] == 400_000  # the pro tier's
        assert created.headers["etag"] == f'"{created.json()["version"]}"'
        issued = await admin.post("/admin/tenants/newco/keys", json={"id": "k1"})
        assert issued.status_code == 201, issued.text
        key = issued.json()["key"]
        assert issued.json()["prefix"] == key[:10]
        async with client_for(app, key) as tenant:
            assert (await tenant.post("/v1/chat/completions", json=CHAT)).status_code == 200
            listed = await admin.get("/admin/tenants/newco/keys")
            assert [k["id"] for k in listed.json()["data"]] == ["k1"]
            assert key not in listed.text
            _no_secrets(listed.text)
            revoked = await admin.post("/admin/tenants/newco/keys/k1/revoke")
            assert revoked.status_code == 200, revoked.text
            assert revoked.json()["revoked"] is True
            refused = await tenant.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 401


async def test_validation_errors_name_the_field() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        bad_limit = await admin.post(
            "/admin/tenants", json={"id": "x", "limits": {"requests_per_minute": "many"}}
        )
        assert bad_limit.status_code == 400
        assert bad_limit.json()["error"]["param"] == "limits.requests_per_minute"
        bad_tier = await admin.post("/admin/tenants", json={"id": "x", "tier": "gold"})
        assert bad_tier.json()["error"]["param"] == "tier"
        bad_model = await admin.post(
            "/admin/tenants", json={"id": "x", "allowed_models": ["gpt-9"]}
        )
        assert bad_model.json()["error"]["param"] == "allowed_models"
        bad_id = await admin.post("/admin/tenants", json={"id": "no spaces"})
        assert bad_id.json()["error"]["param"] == "id"
        unknown = await admin.post("/admin/tenants", json={"id": "x", "colour": "red"})
        assert unknown.status_code == 400
        assert unknown.json()["error"]["param"] == "colour"
        not_json = await admin.post("/admin/tenants", content=b"{nope")
        assert not_json.status_code == 400
        assert not_json.json()["error"]["code"] == "invalid_json"
        patch = await admin.patch("/admin/tenants/acme", json={"limits": {"tokens_per_minute": 0}})
        assert patch.status_code == 400
        assert patch.json()["error"]["param"] == "limits.tokens_per_minute"
        markup = await admin.post("/admin/tenants", json={"id": "x", "markup_percent": -101})
        assert markup.status_code == 400
        assert markup.json()["error"]["param"] == "markup_percent"
        bad_patch = await admin.patch("/admin/tenants/acme", json={"markup_percent": "1e9"})
        assert bad_patch.status_code == 400
        assert bad_patch.json()["error"]["param"] == "markup_percent"
        exists = await admin.post("/admin/tenants", json={"id": "acme"})
        assert exists.status_code == 409
        assert (await admin.put("/admin/tenants/acme", json={})).status_code == 405


async def test_if_match_and_idempotent_create() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        read = await admin.get("/admin/tenants/acme")
        etag = read.headers["etag"]
        first = await admin.patch(
            "/admin/tenants/acme", json={"weight": 0.6}, headers={"if-match": etag}
        )
        assert first.status_code == 200, first.text
        assert first.json()["weight"] == 0.6
        stale = await admin.patch(
            "/admin/tenants/acme", json={"weight": 0.7}, headers={"if-match": etag}
        )
        assert stale.status_code == 412
        assert stale.json()["error"]["code"] == "version_mismatch"
        assert (await admin.get("/admin/tenants/acme")).json()["weight"] == 0.6

        body = {"id": "once", "tier": "free"}
        headers = {"idempotency-key": "create-once-1"}
        a = await admin.post("/admin/tenants", json=body, headers=headers)
        b = await admin.post("/admin/tenants", json=body, headers=headers)
        assert a.status_code == b.status_code == 201
        assert b.headers.get("idempotent-replayed") == "true"
        assert a.json()["version"] == b.json()["version"]
        other = await admin.post(
            "/admin/tenants", json={"id": "twice", "tier": "free"}, headers=headers
        )
        assert other.status_code == 422
        audit = await admin.get("/admin/audit", params={"tenant": "once"})
        assert [e["action"] for e in audit.json()["data"]] == ["tenant.create"]
        updates = await admin.get("/admin/audit", params={"action": "tenant.update"})
        assert [(e["tenant"], e["actor"]) for e in updates.json()["data"]] == [
            ("acme", "admin:ops")
        ]
        assert updates.json()["data"][0]["before_version"] < first.json()["version"]
        as_csv = await admin.get("/admin/audit", params={"format": "csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert as_csv.text.splitlines()[0].startswith("version,at,actor,action,tenant")
        assert len(as_csv.text.splitlines()) == 3  # header, the update, the create
        bad = await admin.get("/admin/audit", params={"since": "yesterday"})
        assert bad.json()["error"]["param"] == "since"
        # A digit outside ASCII ("³" passes str.isdigit) is refused, not a 500.
        superscript = await admin.get("/admin/audit", params={"limit": "\u00b3"})
        assert superscript.status_code == 400
        assert superscript.json()["error"]["param"] == "limit"


async def test_pagination_walks_every_tenant_once() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        for i in range(7):
            assert (await admin.post("/admin/tenants", json={"id": f"t{i}"})).status_code == 201
        seen: list[str] = []
        after: str | None = None
        for _ in range(10):
            params: dict[str, Any] = {"limit": 3, **({"after": after} if after else {})}
            page = (await admin.get("/admin/tenants", params=params)).json()
            seen += [t["id"] for t in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == sorted(["acme", "hobby", *(f"t{i}" for i in range(7))])
        bad = await admin.get("/admin/tenants", params={"limit": 0})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "limit"


async def test_rotation_keeps_the_old_key_for_its_grace() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        graced = await admin.post("/admin/tenants/acme/keys/acme-1/rotate", json={"grace_s": 600})
        assert graced.status_code == 201, graced.text
        new_key = graced.json()["key"]
        assert graced.json()["rotated"]["expires_at"] is not None
        async with client_for(app, KEYS["acme"]) as old, client_for(app, new_key) as new:
            assert (await old.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (await new.post("/v1/chat/completions", json=CHAT)).status_code == 200
            new_id = graced.json()["id"]
            at_once = await admin.post(
                f"/admin/tenants/acme/keys/{new_id}/rotate", json={"grace_s": 0}
            )
            assert at_once.status_code == 201
            assert (await new.post("/v1/chat/completions", json=CHAT)).status_code == 401
            async with client_for(app, at_once.json()["key"]) as newest:
                assert (await newest.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_disable_and_delete() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, ADMIN) as admin,
        client_for(app, KEYS["hobby"]) as hobby,
    ):
        chat = {**CHAT, "model": "gemini-2.5-flash"}
        assert (await hobby.post("/v1/chat/completions", json=chat)).status_code == 200
        off = await admin.patch("/admin/tenants/hobby", json={"disabled": True})
        assert off.json()["disabled"] is True
        assert (await hobby.post("/v1/chat/completions", json=chat)).status_code == 401
        on = await admin.patch("/admin/tenants/hobby", json={"disabled": False})
        assert on.status_code == 200
        assert (await hobby.post("/v1/chat/completions", json=chat)).status_code == 200
        gone = await admin.delete("/admin/tenants/hobby")
        assert gone.json() == {"object": "tenant.deleted", "id": "hobby", "deleted": True}
        assert (await hobby.post("/v1/chat/completions", json=chat)).status_code == 401
        assert (await admin.get("/admin/tenants/hobby")).status_code == 404
        assert (await admin.delete("/admin/tenants/hobby")).status_code == 404


async def test_openapi_document_is_valid() -> None:
    from openapi_spec_validator import validate

    gateway, _ = in_process_gateway(config=admin_config())
    async with client_for(gateway.asgi_app()) as anyone:
        document = (await anyone.get("/admin/openapi.json")).json()
    assert document["openapi"] == "3.1.0"
    validate(document)
    assert "TenantCreate" in document["components"]["schemas"]
    # Every route the admin API serves is in the document (schemathesis then covers it).
    assert {
        "/admin/migration/report",
        "/admin/migration/rules",
        "/admin/migration/rules/{rule}/candidates/{upstream}",
    } <= set(document["paths"])


# -- roles ------------------------------------------------------------------------------------

ROLES = ("admin", "read-only", "tenant-a", "tenant-b", "no-key", "revoked")
#: Every route: (method, path, body, roles that succeed). Tenant A is acme, B is hobby.
ROUTES: list[tuple[str, str, dict[str, Any] | None, set[str]]] = [
    ("GET", "/admin/tenants", None, {"admin", "read-only", "tenant-a", "tenant-b"}),
    ("POST", "/admin/tenants", {"id": "fresh"}, {"admin"}),
    ("GET", "/admin/tenants/acme", None, {"admin", "read-only", "tenant-a"}),
    ("PATCH", "/admin/tenants/acme", {"name": "Acme"}, {"admin"}),
    ("GET", "/admin/tenants/acme/keys", None, {"admin", "read-only", "tenant-a"}),
    ("POST", "/admin/tenants/acme/keys", {}, {"admin"}),
    ("POST", "/admin/tenants/acme/keys/acme-1/rotate", {"grace_s": 60}, {"admin", "tenant-a"}),
    ("POST", "/admin/tenants/acme/keys/acme-1/revoke", None, {"admin"}),
    ("DELETE", "/admin/tenants/acme", None, {"admin"}),
    ("GET", "/admin/tiers", None, {"admin", "read-only"}),
    ("GET", "/admin/keys", None, {"admin"}),
    ("POST", "/admin/keys", {"role": "read-only"}, {"admin"}),
    ("GET", "/admin/audit", None, {"admin", "read-only"}),
    ("GET", "/admin/usage", None, {"admin", "read-only"}),
    ("GET", "/metrics", None, {"admin", "read-only"}),
]


def _key_of(role: str) -> str | None:
    return {
        "admin": ADMIN,
        "read-only": READER,
        "tenant-a": KEYS["acme"],
        "tenant-b": KEYS["hobby"],
        "no-key": None,
        "revoked": KEYS["revoked"],
    }[role]


@pytest.mark.parametrize(("method", "path", "body", "allowed"), ROUTES)
async def test_roles_matrix(
    method: str, path: str, body: dict[str, Any] | None, allowed: set[str]
) -> None:
    for role in ROLES:
        # A fresh gateway per cell: a change made by one caller never decides another's.
        gateway, _ = in_process_gateway(config=admin_config())
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, _key_of(role)) as client:
            response = await client.request(method, path, json=body)
        ok = response.status_code < 300
        assert ok == (role in allowed), (role, method, path, response.status_code, response.text)
        _no_secrets(response.text)
        if not ok:
            expected = {"no-key": 401, "revoked": 401}.get(role)
            if path in ("/admin/usage", "/metrics"):
                expected = 401  # the reports answer any key without report rights so
            if expected is None:
                # Another tenant's id is 404 (its existence is not told); else 403.
                expected = 404 if role == "tenant-b" and "/acme" in path else 403
            assert response.status_code == expected, (role, method, path, response.text)
            assert "error" in response.json()


async def test_a_tenant_lists_only_itself_and_rotates_its_own_key() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, KEYS["hobby"]) as hobby:
        listed = (await hobby.get("/admin/tenants")).json()
        assert [t["id"] for t in listed["data"]] == ["hobby"]
        assert (await hobby.get("/admin/tenants/acme/keys")).status_code == 404
        assert (await hobby.get("/admin/tenants/nobody")).status_code == 404
        rotated = await hobby.post("/admin/tenants/hobby/keys/hobby-1/rotate", json={"grace_s": 0})
        assert rotated.status_code == 201, rotated.text
        # The old key (the one that asked) is refused from now on; the new one works.
        assert (await hobby.get("/admin/tenants/hobby")).status_code == 401
        async with client_for(app, rotated.json()["key"]) as renewed:
            assert (await renewed.get("/admin/tenants/hobby")).status_code == 200
        async with client_for(app, ADMIN) as admin:
            audit = (await admin.get("/admin/audit", params={"tenant": "hobby"})).json()
        assert [(e["action"], e["actor"]) for e in audit["data"]] == [
            ("key.rotate", "tenant:hobby-1")
        ]


# -- the command line -------------------------------------------------------------------------


def test_cli_creates_a_tenant_issues_and_revokes_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from tenantware.cli import main
    from tenantware.testing.serve import serve_in_thread

    gateway, _ = in_process_gateway(config=admin_config())
    with serve_in_thread(gateway.asgi_app()) as url:
        monkeypatch.setenv("TENANTWARE_URL", url)
        monkeypatch.setenv("TENANTWARE_ADMIN_KEY", ADMIN)
        assert main(["tenants", "create", "cli-co", "--tier", "pro", "--limit", "rpm=1"]) == 1
        assert "limits.rpm" in capsys.readouterr().err
        limit = "requests_per_minute=100"
        assert main(["tenants", "create", "cli-co", "--tier", "pro", "--limit", limit]) == 0
        assert json.loads(capsys.readouterr().out)["limits"]["requests_per_minute"] == 100
        assert main(["keys", "issue", "cli-co", "--id", "first"]) == 0
        issued = json.loads(capsys.readouterr().out)
        assert issued["key"].startswith(issued["prefix"])
        assert main(["tenants", "list"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert "cli-co" in [t["id"] for t in listed["data"]]
        assert issued["key"] not in json.dumps(listed)
        assert main(["tenants", "revoke-key", "cli-co", "first"]) == 0
        assert json.loads(capsys.readouterr().out)["revoked"] is True
        monkeypatch.setenv("TENANTWARE_ADMIN_KEY", "sk-wrong")
        assert main(["tenants", "list"]) == 1
        assert "401" in capsys.readouterr().err


def test_cli_registry_export_and_import(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], redis_url: str, redis_prefix: str
) -> None:
    import json

    from tenantware.cli import main

    config = tmp_path / "gateway.json"
    config.write_text(
        json.dumps({"gateway": {"registry_url": redis_url, "redis_prefix": redis_prefix}})
    )
    source = tmp_path / "tenants.json"
    hashed = KeyHasher().hash("sk-imported")
    source.write_text(
        json.dumps(
            {"tenants": [{"id": "imp", "tier": "pro", "keys": [{"id": "k", "hash": hashed}]}]}
        )
    )
    assert main(["registry", "import", "--config", str(config), str(source)]) == 0
    capsys.readouterr()
    assert main(["registry", "export", "--config", str(config)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["tenants"][0]["id"] == "imp"
    assert exported["tenants"][0]["keys"][0]["hash"] == hashed
    # The export is a configuration the gateway loads as is.
    again = tmp_path / "again.json"
    again.write_text(json.dumps(exported))
    assert main(["registry", "import", "--config", str(config), str(again)]) == 0


async def test_admin_keys_issued_and_revoked_through_the_api() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, ADMIN) as admin:
        issued = await admin.post("/admin/keys", json={"id": "auditor-2", "role": "read-only"})
        assert issued.status_code == 201, issued.text
        key = issued.json()["key"]
        async with client_for(app, key) as reader:
            assert (await reader.get("/admin/tenants")).status_code == 200
            assert (await reader.post("/admin/tenants", json={"id": "no"})).status_code == 403
            listed = await admin.get("/admin/keys")
            sources = {k["id"]: k["source"] for k in listed.json()["data"]}
            assert sources == {"ops": "config", "auditor": "config", "auditor-2": "api"}
            assert key not in listed.text
            _no_secrets(listed.text)
            file_key = await admin.post("/admin/keys/ops/revoke")
            assert file_key.status_code == 404
            revoked = await admin.post("/admin/keys/auditor-2/revoke")
            assert revoked.status_code == 200, revoked.text
            assert (await reader.get("/admin/tenants")).status_code == 401
        trail = (await admin.get("/admin/audit", params={"action": "admin_key.issue"})).json()
        assert [(e["key_id"], e["actor"]) for e in trail["data"]] == [("auditor-2", "admin:ops")]


async def test_a_bug_is_an_openai_shaped_500_without_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, _ = in_process_gateway(config=admin_config())

    async def broken(tenant_id: str) -> None:
        raise RuntimeError("secret detail sk-inner")

    monkeypatch.setattr(gateway.registry_store, "get", broken)
    async with client_for(gateway.asgi_app(), ADMIN) as admin:
        response = await admin.get("/admin/tenants/acme")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "sk-inner" not in response.text
    assert response.headers["x-request-id"]


async def test_the_file_registry_refuses_writes_when_several_processes_serve_it() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    gateway.processes = 2  # as under `tenantware serve --workers 2`
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        refused = await admin.post("/admin/tenants", json={"id": "lost"})
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "registry_not_shared"
        assert (await admin.get("/admin/tenants/acme")).status_code == 200


async def test_the_audit_trail_has_one_entry_per_change_and_none_for_refusals() -> None:
    gateway, _ = in_process_gateway(config=admin_config())
    app = gateway.asgi_app()
    async with (
        gateway.running(),
        client_for(app, ADMIN) as admin,
        client_for(app, READER) as reader,
    ):

        async def trail() -> list[dict[str, Any]]:
            entries: list[dict[str, Any]] = (await admin.get("/admin/audit")).json()["data"]
            return entries

        assert await trail() == []
        refusals = [
            await admin.post("/admin/tenants", json={"id": "acme"}),  # exists: 409
            await admin.post("/admin/tenants", json={"id": "x", "tier": "gold"}),  # 400
            await admin.patch(
                "/admin/tenants/acme", json={"weight": 2}, headers={"if-match": "99"}
            ),
            await reader.patch("/admin/tenants/acme", json={"weight": 0.2}),  # 403
            await admin.post("/admin/tenants/acme/keys/nope/revoke"),  # 404
        ]
        assert [r.status_code for r in refusals] == [409, 400, 412, 403, 404]
        assert await trail() == []
        before = (await admin.get("/admin/tenants/acme")).json()["version"]
        changed = await admin.patch("/admin/tenants/acme", json={"weight": 0.2})
        entries = await trail()
        assert len(entries) == 1
        assert entries[0]["action"] == "tenant.update"
        assert entries[0]["before_version"] == before
        assert entries[0]["version"] == changed.json()["version"]
        assert entries[0]["actor"] == "admin:ops"
