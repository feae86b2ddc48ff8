"""Tenant resolution, request context and body handling of TenantMiddleware."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
import structlog

from tenantware import Gateway, TenantMiddleware, get_context, parse_config
from tenantware.state import LiveConfig
from tenantware.types import Receive, Scope, Send
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config, tenant_entries

pytestmark = pytest.mark.anyio


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    detail: dict[str, Any] = body["error"]
    return detail


class Recorder:
    """An inner app that records the context and body it received."""

    def __init__(self) -> None:
        self.body = b""
        self.scope: Scope | None = None
        self.log_context: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        message = await receive()
        self.body = message.get("body", b"")
        self.log_context = structlog.contextvars.get_contextvars()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _stack(inner: Recorder, **overrides: Any) -> TenantMiddleware:
    return TenantMiddleware(inner, live=LiveConfig(make_config(**overrides)))


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer sk-nope"}, {"authorization": f"Bearer {KEYS['revoked']}"}],
    ids=["missing", "unknown", "revoked"],
)
async def test_bad_keys_get_401_invalid_api_key(headers: dict[str, str]) -> None:
    inner = Recorder()
    async with client_for(_stack(inner)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 401
    error = _error(response)
    assert error["code"] == "invalid_api_key"
    assert "acme" not in error["message"]
    assert inner.scope is None


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
async def test_key_is_accepted_from_each_header(header: str) -> None:
    inner = Recorder()
    value = f"Bearer {KEYS['acme']}" if header == "authorization" else KEYS["acme"]
    async with client_for(_stack(inner)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers={header: value})
    assert response.status_code == 200
    assert inner.scope is not None
    ctx = get_context(inner.scope)
    assert ctx.tenant is not None
    assert ctx.tenant.id == "acme"
    assert ctx.key_id == "acme-1"


async def test_body_is_decoded_once_and_replayed_byte_for_byte() -> None:
    inner = Recorder()
    raw = b'{"model": "gpt4", "messages": [{"role":"user","content":"x"}], "max_tokens": 7}'
    async with client_for(_stack(inner), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200
    assert inner.body == raw
    assert inner.scope is not None
    ctx = get_context(inner.scope)
    assert ctx.view is not None
    assert ctx.view.model == "gpt4"
    assert ctx.model == "gpt-4.1"  # alias resolved
    assert ctx.view.output_cap == 7
    assert ctx.estimated_prompt_tokens > 0


async def test_tenant_and_request_id_are_bound_for_inner_layers() -> None:
    inner = Recorder()
    async with client_for(_stack(inner), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert inner.log_context["tenant_id"] == "acme"
    assert inner.log_context["request_id"] == response.headers["x-request-id"]
    assert structlog.contextvars.get_contextvars() == {}


async def test_valid_request_id_is_echoed_and_invalid_one_replaced() -> None:
    inner = Recorder()
    async with client_for(_stack(inner), KEYS["acme"]) as client:
        kept = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"}
        )
        replaced = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"x-request-id": "bad id!"}
        )
        rejected = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"}
        )
    assert kept.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"].startswith("req_")
    assert rejected.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("body", "param"),
    [(b"{not json", None), (b'{"model": 5, "messages": []}', "model"), (b"[1, 2]", None)],
    ids=["malformed", "wrong-type", "not-an-object"],
)
async def test_bad_json_gets_400(body: bytes, param: str | None) -> None:
    inner = Recorder()
    async with client_for(_stack(inner), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert inner.scope is None


async def test_oversized_body_gets_413_by_header_and_by_stream() -> None:
    inner = Recorder()
    app = _stack(inner, gateway={"max_body_bytes": 1000})
    big = msgspec.json.encode({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]})

    async def chunks() -> Any:
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    async with client_for(app, KEYS["acme"]) as client:
        declared = await client.post("/v1/chat/completions", content=big)
        streamed = await client.post("/v1/chat/completions", content=chunks())
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert _error(streamed)["code"] == "request_too_large"


async def test_model_not_allowed_is_403_and_unknown_model_is_404() -> None:
    inner = Recorder()
    async with client_for(_stack(inner), KEYS["hobby"]) as client:
        forbidden = await client.post("/v1/chat/completions", json=CHAT)
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        allowed = await client.post(
            "/v1/chat/completions", json={**CHAT, "model": "gemini-2.5-flash"}
        )
    assert forbidden.status_code == 403
    assert _error(forbidden)["code"] == "model_not_allowed"
    assert unknown.status_code == 404
    assert _error(unknown)["code"] == "model_not_found"
    assert "gemini" not in _error(unknown)["message"]
    assert allowed.status_code == 200


async def test_custom_domains_bind_keys_to_their_tenant() -> None:
    tenants = tenant_entries()
    tenants[0]["domains"] = ["ai.acme.test"]
    inner = Recorder()
    app = _stack(inner, tenants=tenants)
    async with client_for(app) as client:
        own = await client.post(
            "http://ai.acme.test/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {KEYS['acme']}"},
        )
        elsewhere = await client.post(
            "http://other.test/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {KEYS['acme']}"},
        )
        foreign_key_on_acme = await client.post(
            "http://ai.acme.test/v1/chat/completions",
            json={**CHAT, "model": "gemini-2.5-flash"},
            headers={"authorization": f"Bearer {KEYS['hobby']}"},
        )
    assert own.status_code == 200
    assert elsewhere.status_code == 401
    assert foreign_key_on_acme.status_code == 401
    assert _error(foreign_key_on_acme)["code"] == "invalid_api_key"


async def test_non_api_routes_and_non_json_pass_through_untouched() -> None:
    inner = Recorder()
    async with client_for(_stack(inner)) as client:
        response = await client.post("/upload", content=b"\x00binary")
    assert response.status_code == 200
    assert inner.body == b"\x00binary"
    assert inner.scope is not None
    assert get_context(inner.scope).tenant is None
    inner2 = Recorder()
    async with client_for(_stack(inner2), KEYS["acme"]) as client:
        response = await client.post(
            "/v1/audio/transcriptions",
            content=b"--multipart",
            headers={"content-type": "multipart/form-data"},
        )
    assert response.status_code == 200
    assert inner2.body == b"--multipart"


async def test_websocket_and_lifespan_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    app = TenantMiddleware(inner, live=LiveConfig(make_config()))

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent for pass-through scopes")

    await app({"type": "websocket", "path": "/v1/ws", "headers": []}, receive, send)
    await app({"type": "lifespan"}, receive, send)
    assert seen == ["websocket", "lifespan"]


async def test_api_key_never_appears_in_logs(capsys: pytest.CaptureFixture[str]) -> None:
    gateway, _fake = in_process_gateway()
    app = gateway.asgi_app()
    async with client_for(app) as client:
        await client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-leak-me"}
        )
        await client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEYS['acme']}"}
        )
    out = capsys.readouterr()
    assert "sk-leak-me" not in out.out + out.err
    assert KEYS["acme"] not in out.out + out.err


async def test_hmac_key_hashes_need_the_server_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from tenantware import KeyHasher

    monkeypatch.setenv("TW_TEST_SECRET", "s3cret")
    hashed = KeyHasher(b"s3cret").hash("sk-hmac")
    config = parse_config(
        {
            "gateway": {"key_secret_env": "TW_TEST_SECRET"},
            "tenants": [{"id": "h", "keys": [{"id": "k", "hash": hashed}]}],
        }
    )
    inner = Recorder()
    app = TenantMiddleware(inner, live=LiveConfig(config))
    async with client_for(app, "sk-hmac") as client:
        ok = await client.get("/v1/models")
    async with client_for(app, "sk-other") as client:
        bad = await client.get("/v1/models")
    assert ok.status_code == 200
    assert bad.status_code == 401
    assert hashed.startswith("hmac-sha256:")


def test_gateway_exposes_the_stack_outermost_first() -> None:
    gateway = Gateway(make_config())
    assert gateway.middleware(admin=False)[0].cls is TenantMiddleware
    # By default the gateway's own routes (/admin/, /metrics, /v1/usage) come first.
    assert [layer.cls.__name__ for layer in gateway.middleware()[:2]] == [
        "AdminRoutes",
        "TenantMiddleware",
    ]
