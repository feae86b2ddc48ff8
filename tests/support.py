"""Small builders shared by the tests: a config with known keys, in-process gateways."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from tenantware import Gateway, GatewayConfig, HttpxUpstreamClient, KeyHasher, parse_config
from tenantware.testing.upstream import FakeUpstream
from tenantware.types import Message, Receive, Scope

KEYS = {"acme": "sk-test-acme", "hobby": "sk-test-hobby", "revoked": "sk-test-revoked"}


def tenant_entries() -> list[dict[str, Any]]:
    hasher = KeyHasher()
    return [
        {
            "id": "acme",
            "tier": "enterprise",
            "keys": [
                {"id": "acme-1", "hash": hasher.hash(KEYS["acme"])},
                {"id": "acme-old", "hash": hasher.hash(KEYS["revoked"]), "revoked": True},
            ],
        },
        {
            "id": "hobby",
            "tier": "free",
            "allowed_models": ["gemini-2.5-flash"],
            "keys": [{"id": "hobby-1", "hash": hasher.hash(KEYS["hobby"])}],
        },
    ]


def make_config(upstream_url: str = "http://upstream.test/v1", **overrides: Any) -> GatewayConfig:
    """Two tenants (acme: enterprise, every model; hobby: free, gemini only) on one upstream."""
    data: dict[str, Any] = {
        "tenants": tenant_entries(),
        "upstreams": [
            {
                "name": "fake",
                "base_url": upstream_url,
                "models": ["gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2"],
                "timeout_s": 5,
            }
        ],
        "aliases": {"gpt4": "gpt-4.1"},
        # Tests keep usage records in memory unless they choose a ledger.
        "metering": {"ledger_url": "memory://", "request_log": False},
    }
    data.update(overrides)
    return parse_config(data)


def in_process_gateway(
    fake: FakeUpstream | None = None, config: GatewayConfig | None = None
) -> tuple[Gateway, FakeUpstream]:
    """A gateway whose upstream hop goes in-process to a fake upstream (no sockets)."""
    fake = fake or FakeUpstream()
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    return Gateway(config or make_config(), upstream_client=client), fake


def client_for(app: Any, key: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test", headers=headers
    )


CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hello there"}]}


def script_sha(source: str) -> bytes:
    """The SHA1 a Lua script is called by (``EVALSHA``)."""
    return hashlib.sha1(source.encode()).hexdigest().encode()


def stream_scope() -> Scope:
    """The scope of tenant acme's ``POST /v1/chat/completions``, for calling an app directly
    (streaming and disconnect tests: test clients buffer bodies)."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [
            (b"authorization", f"Bearer {KEYS['acme']}".encode()),
            (b"content-type", b"application/json"),
        ],
        "query_string": b"",
    }


def receive_body_then(body: bytes, then: Callable[[], Awaitable[Message]]) -> Receive:
    """An ASGI ``receive``: the request body once, then whatever ``then`` gives."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
