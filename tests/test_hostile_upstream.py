"""A misbehaving upstream: answers too large to hold, a stream answered with JSON, and what
the upstream receives of a body the proxy does not re-encode (issue 21).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.testing.serve import serve_in_thread
from tenantware.types import Message, Receive, Scope, Send
from tests.support import CHAT, KEYS, client_for, make_config, tenant_entries

pytestmark = pytest.mark.anyio

_BAD_UTF8 = '{"model":"%s","messages":[{"role":"user","content":"caf\xe9 \xff"}]%s}'


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# -- a misbehaving upstream ------------------------------------------------------------------


def _gateway_over(handler: Any, **upstream: Any) -> Gateway:
    """A gateway whose upstream is ``handler`` (an ``httpx.MockTransport`` handler)."""
    data = {
        "tenants": tenant_entries(),
        "upstreams": [
            {
                "name": "mock",
                "base_url": "http://upstream.test/v1",
                "models": ["gpt-4.1", "gemini-2.5-flash"],
                "timeout_s": 5,
                **upstream,
            }
        ],
        "aliases": {"gpt4": "gpt-4.1"},
        "metering": {"ledger_url": "memory://", "request_log": False},
    }
    config = make_config(**data)
    client = HttpxUpstreamClient(transport=httpx.MockTransport(handler))
    return Gateway(config, upstream_client=client)


class _Endless(httpx.AsyncByteStream):
    """An answer of up to ``total`` bytes in ``chunk``-sized pieces; counts what was read."""

    def __init__(self, total: int, chunk: int = 64 * 1024, *, sse: bool = False) -> None:
        self.total = total
        self.piece = (b'data: {"x":"' + b"y" * (chunk - 16) + b'"}\n\n') if sse else b"7" * chunk
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.read < self.total:
            self.read += len(self.piece)
            yield self.piece


LIMIT = 1024 * 1024
HUGE = 200 * 1024 * 1024


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_huge_upstream_answer_is_cut_without_being_held_whole(declared: bool) -> None:
    streams: list[_Endless] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        stream = _Endless(HUGE)
        streams.append(stream)
        headers = {"content-type": "application/json"}
        if declared:
            headers["content-length"] = str(HUGE)
        return httpx.Response(200, headers=headers, stream=stream)

    gateway = _gateway_over(upstream, max_response_bytes=LIMIT)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    error = _assert_openai_error(response, 502)
    assert error["code"] == "upstream_response_too_large"
    assert str(LIMIT) in error["message"]
    (stream,) = streams
    assert stream.read <= LIMIT + 2 * len(stream.piece)


async def test_a_huge_upstream_stream_is_cut_with_an_error_event() -> None:
    streams: list[_Endless] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        stream = _Endless(HUGE, sse=True)
        streams.append(stream)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)

    gateway = _gateway_over(upstream, max_response_bytes=LIMIT)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    last = [line for line in response.text.split("\n") if line.startswith("data: ")][-1]
    assert json.loads(last[6:])["error"]["code"] == "upstream_response_too_large"
    (stream,) = streams
    assert stream.read <= LIMIT + 2 * len(stream.piece)


async def test_a_stream_answered_with_plain_json_keeps_the_upstreams_content_type() -> None:
    answer = {
        "id": "x",
        "object": "chat.completion",
        "model": "gpt-4.1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    gateway = _gateway_over(upstream)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await gateway.writer.flush()  # type: ignore[union-attr]
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == answer
    (record,) = gateway.ledger.records.values()  # type: ignore[union-attr]
    assert (record.input_tokens, record.output_tokens, record.estimated) == (7, 1, False)


async def test_invalid_utf8_in_a_body_not_rewritten_is_passed_through_untouched() -> None:
    seen: list[bytes] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(400, json={"error": {"message": "bad", "type": "x"}})

    gateway = _gateway_over(upstream)
    raw = (_BAD_UTF8 % ("gpt-4.1", "")).encode("latin-1")
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", content=raw)
    assert seen == [raw]
    assert response.status_code == 400  # the upstream's own answer


_DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_upstream_answer_nested_too_deeply_is_relayed_not_a_500(stream: bool) -> None:
    if stream:
        body = b'data: {"model":"gpt-4.1","choices":' + _DEEP + b"}\n\ndata: [DONE]\n\n"
        content_type = "text/event-stream"
    else:
        body = b'{"id":"x","model":"gpt-4.1","choices":' + _DEEP + b"}"
        content_type = "application/json"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body)

    gateway = _gateway_over(upstream)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 200
    assert _DEEP in response.content


class _HugeUpstream:
    """A served upstream answering ``HUGE`` bytes (declared or chunked); counts what it could
    hand to its socket before the gateway hung up."""

    def __init__(self, *, declared: bool) -> None:
        self.declared = declared
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"application/json")]
        if self.declared:
            headers.append((b"content-length", str(HUGE).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        piece = b"7" * (64 * 1024)
        gone = anyio.Event()

        async def watch() -> None:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            while self.sent < HUGE and not gone.is_set():
                # uvicorn waits here while the socket is full (until the peer reads or leaves);
                # once the peer left it returns at once, so yield for the watcher to see it.
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                self.sent += len(piece)
                await anyio.lowlevel.checkpoint()
            group.cancel_scope.cancel()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_the_default_client_cuts_a_huge_answer_over_a_socket(declared: bool) -> None:
    upstream = _HugeUpstream(declared=declared)
    with serve_in_thread(upstream) as url:
        config = make_config(
            upstreams=[
                {
                    "name": "huge",
                    "base_url": url + "/v1",
                    "models": ["gpt-4.1"],
                    "timeout_s": 5,
                    "max_response_bytes": LIMIT,
                }
            ]
        )
        gateway = Gateway(config)  # the default aiohttp client
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                with anyio.fail_after(10):
                    response = await client.post("/v1/chat/completions", json=CHAT)
        finally:
            await gateway.proxy.aclose()
    error = _assert_openai_error(response, 502)
    assert error["code"] == "upstream_response_too_large"
    # What was read is about the limit; the rest never left the upstream (socket buffers
    # aside): nothing near the whole answer was taken in.
    assert upstream.sent < HUGE // 8
