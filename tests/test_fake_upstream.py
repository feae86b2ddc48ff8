"""The fake OpenAI upstream: bodies, streams, faults, counters, and serving it on a real port.

Most tests go through httpx's ASGITransport; the disconnect tests drive the ASGI app directly
(test clients buffer whole bodies), and the real-port tests use uvicorn and the openai SDK.
"""

from __future__ import annotations

import base64
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest

from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import (
    DEFAULT_MODELS,
    EMBEDDING_DIMENSIONS,
    TOKEN_TEXT,
    FakeUpstream,
    FakeUpstreamConfig,
    InjectedStreamError,
    count_prompt_tokens,
)
from tenantware.types import Message, Receive, Scope, Send

CHAT = "/v1/chat/completions"
MESSAGES: list[Any] = [  # Any: also passed to the SDK's typed params
    {"role": "system", "content": "You are terse."},  # 14 characters
    {"role": "user", "content": "Say hello please"},  # 16 characters
]
PROMPT_TOKENS = math.ceil(30 / 4) + 3 * 2  # = 14
USAGE_KEYS = {
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
}


def client_for(upstream: FakeUpstream) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream), base_url="http://up")


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1", "messages": MESSAGES, **extra}


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = [event for event in text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def http_scope(path: str = CHAT, method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"rid-1")],
        "client": ("127.0.0.1", 50000),
        "server": ("upstream", 80),
    }


def content_chunks(sent: list[Message]) -> int:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return body.count(b'"delta":{"content":"tok "}')


# --------------------------------------------------------------------------------------------
# Prompt tokens


def test_count_prompt_tokens_is_the_documented_formula() -> None:
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]
    body = {
        "messages": [
            {"role": "user", "content": "abcdefgh"},
            {"role": "user", "content": parts},
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    }
    assert count_prompt_tokens(body) == math.ceil(12 / 4) + 3 * 3
    assert count_prompt_tokens({"messages": MESSAGES}) == PROMPT_TOKENS
    assert count_prompt_tokens({"prompt": "abcde"}) == 2
    assert count_prompt_tokens({"input": ["ab", "cde"]}) == 2
    assert count_prompt_tokens({"input": [1, 2, 3]}) == 3
    assert count_prompt_tokens({"prompt": [[1, 2], [3]]}) == 3
    assert count_prompt_tokens({}) == 0


# --------------------------------------------------------------------------------------------
# Chat completions


@pytest.mark.anyio
async def test_chat_completion_body_is_realistic() -> None:
    upstream = FakeUpstream()
    async with client_for(upstream) as client:
        response = await client.post(CHAT, json=chat_body(model="claude-sonnet-4.5"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert abs(body["created"] - time.time()) < 5
    assert body["model"] == "claude-sonnet-4.5"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == TOKEN_TEXT * 5
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": PROMPT_TOKENS + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@pytest.mark.anyio
@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize(
    ("cap", "tokens", "finish"), [(3, 3, "length"), (7, 7, "stop"), (50, 7, "stop")]
)
async def test_max_tokens_caps_output(cap_field: str, cap: int, tokens: int, finish: str) -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(completion_tokens=7))
    async with client_for(upstream) as client:
        body = (await client.post(CHAT, json=chat_body(**{cap_field: cap}))).json()
        stream = await client.post(CHAT, json=chat_body(stream=True, **{cap_field: cap}))
    assert body["choices"][0]["message"]["content"] == TOKEN_TEXT * tokens
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"]["completion_tokens"] == tokens
    chunks = [msgspec.json.decode(d) for d in sse_data(stream.text)[:-1]]
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) == tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == finish


@pytest.mark.anyio
async def test_config_changes_apply_to_the_next_request() -> None:
    config = FakeUpstreamConfig()
    upstream = FakeUpstream(config)
    async with client_for(upstream) as client:
        config.stream_chunks = 2  # completion_tokens defaults to stream_chunks
        first = (await client.post(CHAT, json=chat_body())).json()
        config.completion_tokens = 4
        second = (await client.post(CHAT, json=chat_body())).json()
        config.completion_tokens = 0
        third = (await client.post(CHAT, json=chat_body())).json()
    assert first["usage"]["completion_tokens"] == 2
    assert second["choices"][0]["message"]["content"] == TOKEN_TEXT * 4
    assert third["choices"][0]["message"]["content"] == ""


@pytest.mark.anyio
async def test_chat_stream_without_usage() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(stream_chunks=3))
    async with client_for(upstream) as client:
        response = await client.post(
            CHAT, json=chat_body(stream=True), headers={"x-request-id": "r1"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"] == "r1"
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(d) for d in data[:-1]]
    assert len(chunks) == 1 + 3 + 1  # role, content, finish
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "gpt-4.1"
        assert "usage" not in chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == TOKEN_TEXT * 3
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


@pytest.mark.anyio
async def test_chat_stream_include_usage_sends_the_final_usage_chunk() -> None:
    upstream = FakeUpstream()
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=4)
    async with client_for(upstream) as client:
        response = await client.post(CHAT, json=body)
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(d) for d in data[:-1]]
    *earlier, last = chunks
    assert all(c["usage"] is None for c in earlier)
    assert earlier[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == PROMPT_TOKENS + 4
    assert set(last["usage"]) == USAGE_KEYS
    assert upstream.stats.completion_tokens == 4


# --------------------------------------------------------------------------------------------
# Legacy completions, embeddings, models, health


@pytest.mark.anyio
async def test_legacy_completions_json_and_stream() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(stream_chunks=3))
    async with client_for(upstream) as client:
        body = {"model": "deepseek-v3.2", "prompt": "abcdefgh"}
        plain = (await client.post("/v1/completions", json=body)).json()
        streamed = await client.post(
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert plain["id"].startswith("cmpl-")
    assert plain["object"] == "text_completion"
    assert plain["model"] == "deepseek-v3.2"
    assert plain["choices"][0]["text"] == TOKEN_TEXT * 3
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["prompt_tokens"] == 2
    assert plain["usage"]["completion_tokens"] == 3

    data = sse_data(streamed.text)
    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == TOKEN_TEXT * 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 5


@pytest.mark.anyio
async def test_embeddings_are_deterministic_unit_vectors() -> None:
    upstream = FakeUpstream()
    async with client_for(upstream) as client:
        url = "/v1/embeddings"
        first = (await client.post(url, json={"model": "e", "input": ["hello", "world"]})).json()
        again = (await client.post(url, json={"model": "e", "input": "hello"})).json()
        sized = (await client.post(url, json={"model": "e", "input": "x", "dimensions": 3})).json()
        packed = await client.post(
            url, json={"model": "e", "input": "hello", "encoding_format": "base64"}
        )
        token_ids = (await client.post(url, json={"model": "e", "input": [1, 2, 3]})).json()
        empty = await client.post(url, json={"model": "e", "input": []})
    assert first["object"] == "list"
    assert first["model"] == "e"
    assert [d["index"] for d in first["data"]] == [0, 1]
    hello, world = (d["embedding"] for d in first["data"])
    assert len(hello) == EMBEDDING_DIMENSIONS
    assert hello != world
    assert again["data"][0]["embedding"] == hello
    assert math.isclose(sum(v * v for v in hello), 1.0)
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert len(sized["data"][0]["embedding"]) == 3
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", raw)
    assert decoded == pytest.approx(hello, abs=1e-6)
    assert len(token_ids["data"]) == 1
    assert token_ids["usage"]["prompt_tokens"] == 3
    assert assert_openai_error(empty, 400)["param"] == "input"


@pytest.mark.anyio
async def test_models_follow_the_config_and_healthz_is_not_counted() -> None:
    upstream = FakeUpstream()
    async with client_for(upstream) as client:
        listed = (await client.get("/v1/models")).json()
        upstream.config.models = ["only-one"]
        changed = (await client.get("/v1/models")).json()
        health = await client.get("/healthz")
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == list(DEFAULT_MODELS)
    assert all(m["object"] == "model" for m in listed["data"])
    assert [m["id"] for m in changed["data"]] == ["only-one"]
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert upstream.stats.requests == 2


@pytest.mark.anyio
async def test_routes_work_under_a_mount_prefix() -> None:
    upstream = FakeUpstream()
    async with client_for(upstream) as client:
        mounted = await client.post("/_demo_upstream/v1/chat/completions", json=chat_body())
        models = await client.get("/_demo_upstream/v1/models")
        health = await client.get("/_demo_upstream/healthz")
        unknown = await client.post("/v1/chat/completion", json=chat_body())
        not_v1 = await client.get("/_demo_upstream/xv1/models")
        wrong_method = await client.get(CHAT)
    assert mounted.json()["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert models.status_code == 200
    assert health.status_code == 200
    assert assert_openai_error(unknown, 404)["type"] == "invalid_request_error"
    assert_openai_error(not_v1, 404)
    assert_openai_error(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"


# --------------------------------------------------------------------------------------------
# Errors and fault injection


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b'{"model": "m"}', None),  # messages missing
        (b'{"model": "m", "messages": [], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
    ],
)
async def test_bad_bodies_get_an_openai_400(raw: bytes, param: str | None) -> None:
    upstream = FakeUpstream()
    upstream.config.fail_next = [500]
    async with client_for(upstream) as client:
        response = await client.post(CHAT, content=raw, headers={"x-request-id": "bad"})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert upstream.config.fail_next == [500]  # a rejected request consumes no fault
    assert upstream.stats.by_request_id["bad"].outcome == "error"
    assert upstream.stats.by_status == {400: 1}


@pytest.mark.anyio
async def test_require_api_key() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(require_api_key="sk-good", fail_next=[503]))
    async with client_for(upstream) as client:
        missing = await client.post(CHAT, json=chat_body())
        wrong = await client.post(CHAT, json=chat_body(), headers={"authorization": "Bearer x"})
        good = await client.post(
            CHAT, json=chat_body(), headers={"authorization": "Bearer sk-good"}
        )
    for response in (missing, wrong):
        error = assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
    assert good.status_code == 503  # the queued fault waited for an authorised request
    assert upstream.stats.by_status == {401: 2, 503: 1}


@pytest.mark.anyio
async def test_fail_next_is_a_queue_of_statuses() -> None:
    config = FakeUpstreamConfig(fail_next=[500, 429, 200, 503], retry_after_s=2)
    upstream = FakeUpstream(config)
    async with client_for(upstream) as client:
        responses = [await client.post(CHAT, json=chat_body()) for _ in range(5)]
    assert [r.status_code for r in responses] == [500, 429, 200, 503, 200]
    assert config.fail_next == []
    assert assert_openai_error(responses[0], 500)["type"] == "server_error"
    rate_limited = assert_openai_error(responses[1], 429)
    assert rate_limited["code"] == "rate_limit_exceeded"
    assert responses[1].headers["retry-after"] == "2"
    assert "retry-after" not in responses[0].headers
    assert upstream.stats.by_status == {500: 1, 429: 1, 503: 1, 200: 2}
    # Failed requests are billed nothing.
    assert upstream.stats.prompt_tokens == 2 * PROMPT_TOKENS
    assert upstream.stats.completion_tokens == 2 * 5


@pytest.mark.anyio
async def test_failure_rate_is_seeded_and_uses_failure_status() -> None:
    async def pattern(seed: int, rate: float) -> list[int]:
        config = FakeUpstreamConfig(failure_rate=rate, failure_status=503)
        upstream = FakeUpstream(config, seed=seed)
        async with client_for(upstream) as client:
            return [(await client.get("/v1/models")).status_code for _ in range(40)]

    first = await pattern(7, 0.5)
    assert first == await pattern(7, 0.5)
    assert set(first) == {200, 503}
    assert await pattern(7, 0.0) == [200] * 40
    assert await pattern(7, 1.0) == [503] * 40


@pytest.mark.anyio
async def test_latency_delays_the_response() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(latency_s=0.05))
    async with client_for(upstream) as client:
        started = time.perf_counter()
        await client.post(CHAT, json=chat_body())
        assert time.perf_counter() - started >= 0.05
        upstream.config.latency_s = 0
        started = time.perf_counter()
        await client.post(CHAT, json=chat_body())
        assert time.perf_counter() - started < 0.05


# --------------------------------------------------------------------------------------------
# Counters and the last request


@pytest.mark.anyio
async def test_stats_records_and_reset() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(fail_next=[500]))
    async with client_for(upstream) as client:
        await client.post(CHAT, json=chat_body(), headers={"x-request-id": "failed"})
        await client.post(
            CHAT,
            json=chat_body(model="gemini-2.5-flash", max_tokens=2),
            headers={"x-request-id": "plain", "authorization": "Bearer whatever"},
        )
        await client.post(CHAT, json=chat_body(stream=True), headers={"x-request-id": "streamed"})
        await client.post("/v1/embeddings", json={"model": "e", "input": "abcdefgh"})
    stats = upstream.stats
    assert stats.requests == 4
    assert stats.in_flight == 0
    assert stats.by_status == {500: 1, 200: 3}
    assert stats.prompt_tokens == 2 * PROMPT_TOKENS + 2
    assert stats.completion_tokens == 2 + 5
    assert set(stats.by_request_id) == {"failed", "plain", "streamed"}
    failed = stats.by_request_id["failed"]
    assert (failed.status, failed.outcome, failed.model) == (500, "error", "gpt-4.1")
    assert (failed.prompt_tokens, failed.completion_tokens) == (0, 0)
    plain = stats.by_request_id["plain"]
    assert plain.model == "gemini-2.5-flash"
    assert (plain.prompt_tokens, plain.completion_tokens) == (PROMPT_TOKENS, 2)
    assert plain.has_authorization
    assert not plain.stream
    streamed = stats.by_request_id["streamed"]
    assert streamed.stream
    assert (streamed.completion_tokens, streamed.outcome) == (5, "completed")
    assert not streamed.has_authorization

    upstream.reset()
    assert upstream.stats.requests == 0
    assert upstream.stats.by_request_id == {}
    assert upstream.last_request is None


@pytest.mark.anyio
async def test_record_requests_off_keeps_only_totals() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(record_requests=False))
    async with client_for(upstream) as client:
        await client.post(CHAT, json=chat_body(), headers={"x-request-id": "r"})
    assert upstream.stats.by_request_id == {}
    assert upstream.stats.completion_tokens == 5


@pytest.mark.anyio
async def test_last_request_keeps_headers_but_not_the_key() -> None:
    upstream = FakeUpstream()
    raw = msgspec.json.encode(chat_body(user="u1"))
    async with client_for(upstream) as client:
        await client.post(
            "/x/v1/chat/completions",
            content=raw,
            headers={"authorization": "Bearer sk-secret", "x-tenant": "acme"},
        )
    last = upstream.last_request
    assert last is not None
    assert (last.method, last.path) == ("POST", "/x/v1/chat/completions")
    assert last.body == raw
    assert last.json()["user"] == "u1"
    assert last.headers["x-tenant"] == "acme"
    assert last.headers["authorization"] == "[redacted]"
    assert "sk-secret" not in repr(upstream.last_request)
    assert "sk-secret" not in repr(upstream.stats)


@pytest.mark.anyio
async def test_concurrent_requests_all_add_up() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(chunk_delay_s=0.001))

    async def call(client: httpx.AsyncClient, stream: bool) -> None:
        response = await client.post(CHAT, json=chat_body(stream=stream))
        assert response.status_code == 200

    async with client_for(upstream) as client, anyio.create_task_group() as tasks:
        for index in range(50):
            tasks.start_soon(call, client, index % 2 == 0)
    assert upstream.stats.requests == 50
    assert upstream.stats.in_flight == 0
    assert upstream.stats.completion_tokens == 50 * 5


# --------------------------------------------------------------------------------------------
# Broken streams and client disconnects


@pytest.mark.anyio
async def test_fail_stream_after_breaks_the_stream_in_process() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(fail_stream_after=2))
    async with client_for(upstream) as client:
        with pytest.raises(InjectedStreamError):
            await client.post(CHAT, json=chat_body(stream=True), headers={"x-request-id": "cut"})
        # Plain JSON answers are not affected.
        assert (await client.post(CHAT, json=chat_body())).status_code == 200
    record = upstream.stats.by_request_id["cut"]
    assert (record.completion_tokens, record.outcome, record.status) == (2, "stream_failed", 200)
    assert upstream.stats.completion_tokens == 2 + 5


@pytest.mark.anyio
async def test_fail_stream_after_sends_no_final_events() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(fail_stream_after=3))
    sent: list[Message] = []
    body = msgspec.json.encode(chat_body(stream=True, stream_options={"include_usage": True}))
    never = anyio.Event()

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # like a server: nothing more until the client leaves
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(InjectedStreamError):
        await upstream(http_scope(), receive, send)
    assert content_chunks(sent) == 3
    assert all(m.get("more_body") for m in sent[1:])  # the body never ended
    everything = b"".join(m.get("body", b"") for m in sent[1:])
    assert b"[DONE]" not in everything
    assert b'"finish_reason":"stop"' not in everything


@pytest.mark.anyio
async def test_client_disconnect_stops_the_stream_and_counts_what_was_sent() -> None:
    config = FakeUpstreamConfig(stream_chunks=50, chunk_delay_s=0.01)
    upstream = FakeUpstream(config)
    sent: list[Message] = []
    gone = anyio.Event()
    body = msgspec.json.encode(chat_body(stream=True))
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if content_chunks(sent) == 3:
            gone.set()

    with anyio.fail_after(2):  # 50 chunks would take 0.5 s; stopping is immediate
        await upstream(http_scope(), receive, send)
    assert content_chunks(sent) == 3
    record = upstream.stats.by_request_id["rid-1"]
    assert (record.completion_tokens, record.outcome) == (3, "client_disconnected")
    assert record.prompt_tokens == PROMPT_TOKENS
    assert upstream.stats.completion_tokens == 3
    assert upstream.stats.in_flight == 0


@pytest.mark.anyio
async def test_send_failing_counts_only_the_chunks_that_went_out() -> None:
    upstream = FakeUpstream(FakeUpstreamConfig(stream_chunks=10))
    sent: list[Message] = []
    body = msgspec.json.encode(chat_body(stream=True))
    gone = anyio.Event()

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if content_chunks([*sent, message]) == 5:
            raise ConnectionResetError("peer went away")
        sent.append(message)

    await upstream(http_scope(), receive, send)
    record = upstream.stats.by_request_id["rid-1"]
    assert (record.completion_tokens, record.outcome) == (4, "client_disconnected")


@pytest.mark.anyio
async def test_client_gone_before_the_body_arrived() -> None:
    upstream = FakeUpstream()
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await upstream(http_scope(), receive, send)
    assert sent == []
    record = upstream.stats.by_request_id["rid-1"]
    assert (record.status, record.outcome) == (0, "client_disconnected")
    assert upstream.stats.in_flight == 0


@pytest.mark.anyio
async def test_lifespan_is_answered() -> None:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    await FakeUpstream()({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --------------------------------------------------------------------------------------------
# On a real port


@pytest.fixture
def served() -> Iterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream(FakeUpstreamConfig(require_api_key="sk-test"))
    with serve_in_thread(upstream) as base_url:
        yield upstream, base_url


def wait_settled(upstream: FakeUpstream) -> None:
    deadline = time.monotonic() + 5
    while upstream.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.stats.in_flight == 0


def test_openai_sdk_against_a_real_port(served: tuple[FakeUpstream, str]) -> None:
    upstream, base_url = served
    upstream.config.fail_next = [429, 429]
    upstream.config.retry_after_s = 0.01
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=2) as client:
        completion = client.chat.completions.create(
            model="gpt-4.1",
            messages=MESSAGES,
            max_tokens=3,
            extra_headers={"x-request-id": "sdk-1"},
        )
        assert completion.choices[0].message.content == TOKEN_TEXT * 3
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == PROMPT_TOKENS

        stream = client.chat.completions.create(
            model="deepseek-v3.2",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "sdk-2"},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            TOKEN_TEXT * 5
        )
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 5

        embedding = client.embeddings.create(model="e", input="hello")  # base64 by default
        assert len(embedding.data[0].embedding) == EMBEDDING_DIMENSIONS
        assert [m.id for m in client.models.list()] == list(DEFAULT_MODELS)

    with (
        pytest.raises(openai.AuthenticationError),
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as wrong,
    ):
        wrong.models.list()

    stats = upstream.stats
    assert stats.by_status == {429: 2, 200: 4, 401: 1}
    assert stats.by_request_id["sdk-1"].completion_tokens == 3
    assert stats.by_request_id["sdk-1"].has_authorization
    streamed = stats.by_request_id["sdk-2"]
    assert (streamed.stream, streamed.completion_tokens, streamed.model) == (
        True,
        5,
        "deepseek-v3.2",
    )


def test_real_port_client_disconnect_and_broken_stream(served: tuple[FakeUpstream, str]) -> None:
    upstream, base_url = served
    upstream.config.stream_chunks = 100
    upstream.config.chunk_delay_s = 0.01
    headers = {"authorization": "Bearer sk-test", "x-request-id": "left"}
    with (
        httpx.Client(base_url=base_url) as client,
        client.stream("POST", CHAT, json=chat_body(stream=True), headers=headers) as response,
    ):
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
    assert len(received) == 3  # the role chunk and two content chunks (blank lines between)
    wait_settled(upstream)
    record = upstream.stats.by_request_id["left"]
    assert record.outcome == "client_disconnected"
    assert 2 <= record.completion_tokens < 100

    upstream.config.chunk_delay_s = 0
    upstream.config.fail_stream_after = 4
    headers["x-request-id"] = "broken"
    with (
        httpx.Client(base_url=base_url) as client,
        client.stream("POST", CHAT, json=chat_body(stream=True), headers=headers) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    wait_settled(upstream)
    record = upstream.stats.by_request_id["broken"]
    assert (record.outcome, record.completion_tokens) == ("stream_failed", 4)


def test_serve_in_thread_serves_any_app_and_stops() -> None:
    async def hello(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})

    with serve_in_thread(hello) as base_url:
        assert httpx.get(base_url).text == "hi"
        port = int(base_url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_module_runs_standalone() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "tenantware.testing.upstream", "--port", str(port)]
    argv += ["--latency-ms", "0", "--chunks", "20", "--chunk-delay-ms", "0"]
    proc = subprocess.Popen(argv, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}{CHAT}", json=chat_body(), timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "the fake upstream exited"
                assert time.monotonic() < deadline, "the fake upstream did not start"
                time.sleep(0.05)
        assert response.json()["usage"]["completion_tokens"] == 20
    finally:
        proc.terminate()
        proc.wait(10)
