"""Hostile requests at the tenant layer and the proxy: bodies, hosts, routes (issue 21).

Each case was measured against the gateway once (a 500 with a traceback, another tenant's key
accepted on a custom domain, the model list without a key) and must stay fixed: every answer
is an OpenAI-shaped error with the right status, never a 500.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantware import Gateway
from tenantware.types import ASGIApp, Message, Scope
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config, tenant_entries

pytestmark = pytest.mark.anyio


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# -- the request body ------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return (
        b'{"model":"gpt-4.1","messages":[{"role":"user","content":'
        + b"[" * depth
        + b"]" * depth
        + b"}]}"
    )


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_a_deeply_nested_body_is_a_400_naming_the_problem(depth: int) -> None:
    gateway, fake = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", content=_nested(depth))
        # Nested where the gateway skips the value unread, too.
        top = await client.post(
            "/v1/chat/completions",
            content=b'{"model":"gpt-4.1","x":' + b"[" * depth + b"]" * depth + b"}",
        )
    for answer in (response, top):
        error = _assert_openai_error(answer, 400)
        assert "nested too deeply" in error["message"]
    assert fake.stats.requests == 0


_BAD_UTF8 = '{"model":"%s","messages":[{"role":"user","content":"caf\xe9 \xff"}]%s}'


@pytest.mark.parametrize(
    ("model", "extra"),
    [("gpt4", ""), ("gpt-4.1", ',"stream":true')],
    ids=["alias", "stream-without-include-usage"],
)
async def test_invalid_utf8_in_a_body_the_proxy_rewrites_is_a_400(model: str, extra: str) -> None:
    gateway, fake = in_process_gateway()
    raw = (_BAD_UTF8 % (model, extra)).encode("latin-1")
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", content=raw)
    error = _assert_openai_error(response, 400)
    assert "UTF-8" in error["message"]
    assert fake.stats.requests == 0


# -- calling the gateway directly ----------------------------------------------------------


def _scope(
    headers: list[tuple[bytes, bytes]],
    *,
    raw_path: bytes = b"/v1/chat/completions",
    client: tuple[str, int] = ("203.0.113.9", 50000),
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 8080),
        "client": client,
        "headers": headers,
    }


async def _call(app: ASGIApp, scope: Scope, body: bytes) -> tuple[int, dict[str, Any]]:
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await anyio.sleep_forever()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await app(scope, receive, send)
    status = sent[0]["status"]
    data = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(data) if data.startswith(b"{") else {}


HOBBY_CHAT = json.dumps({**CHAT, "model": "gemini-2.5-flash"}).encode()


def _headers(host: bytes, key: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (b"host", host),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer " + key.encode()),
        *extra,
    ]


# -- hosts -----------------------------------------------------------------------------------


def _domain_gateway(**gateway_settings: Any) -> Gateway:
    tenants = tenant_entries()
    tenants[0]["domains"] = ["ai.acme.example"]
    config = make_config(tenants=tenants, gateway=gateway_settings)
    gateway, _ = in_process_gateway(config=config)
    return gateway


@pytest.mark.parametrize(
    "host",
    [b"ai.acme.example", b"AI.Acme.Example", b"ai.acme.example.", b"ai.acme.example.:443"],
)
async def test_another_tenants_key_is_refused_on_a_custom_domain_however_spelled(
    host: bytes,
) -> None:
    app = _domain_gateway().asgi_app()
    status, body = await _call(app, _scope(_headers(host, KEYS["hobby"])), HOBBY_CHAT)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    status, _ = await _call(app, _scope(_headers(host, KEYS["acme"])), HOBBY_CHAT)
    assert status == 200


async def test_several_host_headers_are_refused() -> None:
    app = _domain_gateway().asgi_app()
    for first, second in [(b"gw.example", b"ai.acme.example"), (b"ai.acme.example", b"gw.test")]:
        headers = _headers(first, KEYS["hobby"], (b"host", second))
        status, body = await _call(app, _scope(headers), HOBBY_CHAT)
        assert status == 400
        assert "Host" in body["error"]["message"]


async def test_an_absolute_form_url_whose_host_disagrees_with_host_is_refused() -> None:
    app = _domain_gateway().asgi_app()
    scope = _scope(
        _headers(b"gw.example", KEYS["hobby"]),
        raw_path=b"http://ai.acme.example/v1/chat/completions",
    )
    status, body = await _call(app, scope, HOBBY_CHAT)
    assert status == 400
    assert "Host" in body["error"]["message"]
    agreeing = _scope(
        _headers(b"AI.acme.example:80", KEYS["acme"]),
        raw_path=b"http://ai.acme.example/v1/chat/completions",
    )
    status, _ = await _call(app, agreeing, HOBBY_CHAT)
    assert status == 200


async def test_x_forwarded_host_counts_only_from_a_trusted_proxy() -> None:
    forwarded = (b"x-forwarded-host", b"ai.acme.example")
    untrusting = _domain_gateway().asgi_app()
    headers = _headers(b"gateway.internal", KEYS["hobby"], forwarded)
    status, _ = await _call(untrusting, _scope(headers, client=("10.1.2.3", 1)), HOBBY_CHAT)
    assert status == 200  # the header is ignored: the host is gateway.internal
    trusting = _domain_gateway(trusted_proxies=["10.0.0.0/8"]).asgi_app()
    status, _ = await _call(trusting, _scope(headers, client=("10.1.2.3", 1)), HOBBY_CHAT)
    assert status == 401  # behind the proxy, the host is acme's domain
    status, _ = await _call(trusting, _scope(headers, client=("192.0.2.1", 1)), HOBBY_CHAT)
    assert status == 200  # not from the proxy: ignored again
    acme = _headers(b"gateway.internal", KEYS["acme"], forwarded)
    status, _ = await _call(trusting, _scope(acme, client=("10.1.2.3", 1)), HOBBY_CHAT)
    assert status == 200


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    with pytest.raises(Exception, match="not an address or network"):
        make_config(gateway={"trusted_proxies": ["not-an-address"]})


# -- routes outside /v1/ ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/models"), ("POST", "/chat/completions"), ("POST", "/embeddings")],
)
async def test_proxy_routes_outside_the_api_prefix_need_a_key(method: str, path: str) -> None:
    gateway, fake = in_process_gateway()
    async with client_for(gateway.asgi_app()) as anonymous:
        response = await anonymous.request(method, path, json=CHAT)
    error = _assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert "gpt-4.1" not in response.text
    assert fake.stats.requests == 0
    async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
        models = await client.get("/v1/models")
    assert [m["id"] for m in models.json()["data"]] == ["gemini-2.5-flash"]


# -- the body decoder, property-based --------------------------------------------------------

#: Stands for raw bytes spliced into a string after encoding (``_render``).
_MARK = "\u2603"
_text = st.text(
    alphabet=st.sampled_from(f'ab"\\\u00e9\u20ac{_MARK}') | st.characters(codec="utf-8"), max_size=8
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_field_values = st.one_of(_json, st.sampled_from(["gpt4", "gpt-4.1", f"gpt4{_MARK}", True]))
_request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": _field_values,
        "messages": st.one_of(
            _json, st.lists(st.fixed_dictionaries({"role": _text, "content": _json}))
        ),
        "stream": _field_values,
        "max_tokens": _field_values,
        "n": _field_values,
        "stream_options": st.one_of(_field_values, st.just({"include_usage": False})),
        "prompt": _json,
        "input": _json,
    },
)
#: What no JSON encoder writes inside a string: invalid UTF-8, lone surrogates, raw control
#: characters (and brackets that end it early).
_junk = st.sampled_from(
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\\udc00x", b"\x00", b"\n", b"[" * 3000]
)


def _render(data: dict[str, Any], junk: bytes) -> bytes:
    """``data`` as JSON with ``junk`` in place of every mark inside its strings."""
    return json.dumps(data, ensure_ascii=False).encode().replace(_MARK.encode(), junk)


def _mangle(data: bytes, cut: int, junk: bytes) -> bytes:
    """A valid body with raw bytes spliced in (truncation, stray brackets and quotes)."""
    at = cut % (len(data) + 1)
    return data[:at] + junk + data[at:]


def _nested_at(field: str, depth: int, opener: str) -> bytes:
    closer = "]" if opener == "[" else "}"
    inner = '{"a":' if opener == "{" else "["
    value = inner * depth + "1" * (opener == "{") + closer * depth
    head = '{"model":"gpt-4.1","messages":[{"role":"user","content":"x"}]'
    return f'{head},"{field}":{value}}}'.encode()


_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(_render, _request_like, _junk),
    st.builds(
        _mangle,
        _request_like.map(lambda d: json.dumps(d).encode()),
        st.integers(min_value=0),
        st.sampled_from([b"[" * 3000, b"}", b'"', b"\x00", b"1e999", b"-"]),
    ),
    st.builds(
        _nested_at,
        st.sampled_from(["messages", "model", "prompt", "input", "stream_options", "other"]),
        st.integers(min_value=1, max_value=5000),
        st.sampled_from(["[", "{"]),
    ),
)


def test_no_body_makes_the_gateway_answer_500_or_unshaped() -> None:
    """Random bytes and request-shaped JSON: an upstream answer or an OpenAI-shaped 4xx."""
    gateway, _fake = in_process_gateway()
    app = gateway.asgi_app()
    headers = _headers(b"gateway.test", KEYS["acme"])

    async def one(body: bytes) -> None:
        for path in (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings"):
            scope = _scope(headers, raw_path=path)
            scope["path"] = path.decode()
            status, answer = await _call(app, scope, body)
            assert status < 500, (status, answer, body)
            if status >= 400:
                assert set(answer["error"]) == {"message", "type", "param", "code"}

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_bodies)
    def check(body: bytes) -> None:
        anyio.run(one, body)

    check()
