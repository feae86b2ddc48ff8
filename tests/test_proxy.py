"""The bundled proxy: relaying JSON and SSE, errors, disconnects, and the official SDK."""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import Iterator
from typing import Any

import anyio
import openai
import pytest

from tenantware import Gateway, get_context
from tenantware.context import Outcome
from tenantware.proxy import relay as proxy_relay
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig, count_prompt_tokens
from tenantware.types import Message, Receive, Scope
from tests.support import (
    CHAT,
    KEYS,
    client_for,
    in_process_gateway,
    make_config,
    receive_body_then,
    stream_scope,
)

pytestmark = pytest.mark.anyio


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


async def test_json_completion_is_relayed_with_usage_in_context() -> None:
    gateway, fake = in_process_gateway()
    seen: dict[str, Any] = {}
    app = gateway.wrap(_capturing(gateway, seen))
    async with client_for(app, KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["usage"]["completion_tokens"] == 3
    ctx = seen["ctx"]
    assert ctx.usage.input_tokens == count_prompt_tokens(CHAT)
    assert ctx.usage.output_tokens == 3
    assert ctx.outcome == Outcome.OK
    assert ctx.upstream == "fake"
    assert fake.last_request is not None
    assert fake.last_request.headers["x-request-id"] == response.headers["x-request-id"]


def _capturing(gateway: Gateway, seen: dict[str, Any]) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen["ctx"] = get_context(scope)
        await gateway.proxy(scope, receive, send)

    return app


async def test_original_body_is_forwarded_unchanged_unless_the_model_is_an_alias() -> None:
    gateway, fake = in_process_gateway()
    raw = b'{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],"temperature":0.5}'
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        await client.post("/v1/chat/completions", content=raw)
        assert fake.last_request is not None
        assert fake.last_request.body == raw
        await client.post(
            "/v1/chat/completions", json={**CHAT, "model": "gpt4", "temperature": 0.5}
        )
    assert fake.last_request is not None
    sent = fake.last_request.json()
    assert sent["model"] == "gpt-4.1"
    assert sent["temperature"] == 0.5


async def test_stream_usage_chunk_is_hidden_unless_the_client_asked() -> None:
    gateway, fake = in_process_gateway(FakeUpstream(FakeUpstreamConfig(stream_chunks=4)))
    seen: dict[str, Any] = {}
    app = gateway.wrap(_capturing(gateway, seen))
    async with client_for(app, KEYS["acme"]) as client:
        plain = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert fake.last_request is not None
        assert fake.last_request.json()["stream_options"] == {"include_usage": True}
        hidden_ctx = seen["ctx"]
        asked = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        )
    plain_events = _events(plain.text)
    assert plain_events[-1] == "[DONE]"
    assert all('"usage":{' not in e.replace(" ", "") for e in plain_events)
    assert hidden_ctx.usage.output_tokens == 4
    assert not hidden_ctx.usage.estimated
    asked_events = [json.loads(e) for e in _events(asked.text)[:-1]]
    assert asked_events[-1]["usage"]["completion_tokens"] == 4
    assert asked_events[-1]["choices"] == []


async def test_models_lists_only_the_tenants_models() -> None:
    gateway, _ = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
        response = await client.get("/v1/models")
    assert [m["id"] for m in response.json()["data"]] == ["gemini-2.5-flash"]


async def test_request_errors_are_openai_shaped() -> None:
    gateway, _ = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        no_messages = await client.post("/v1/chat/completions", json={"model": "gpt-4.1"})
        no_model = await client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
        empty = await client.post("/v1/chat/completions", content=b"")
        unknown_route = await client.post("/v1/nothing-here", json=CHAT)
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["param"] == "messages"
    assert no_model.status_code == 400
    assert no_model.json()["error"]["param"] == "model"
    assert empty.status_code == 400
    assert unknown_route.status_code == 404


async def test_upstream_error_status_and_body_are_relayed() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(fail_next=[503, 429], retry_after_s=2))
    # Without retries, so that each injected error reaches the client as it is.
    gateway, _ = in_process_gateway(fake, make_config(breaker={"max_attempts": 1}))
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        unavailable = await client.post("/v1/chat/completions", json=CHAT)
        limited = await client.post("/v1/chat/completions", json=CHAT)
    assert unavailable.status_code == 503
    assert "error" in unavailable.json()
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"


async def test_unreachable_upstream_is_502_and_slow_upstream_is_504() -> None:
    from tests.servers import find_free_port

    dead = Gateway(make_config(f"http://127.0.0.1:{find_free_port()}/v1"))
    try:
        async with client_for(dead.asgi_app(), KEYS["acme"]) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    finally:
        await dead.proxy.aclose()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"

    fake = FakeUpstream(FakeUpstreamConfig(latency_s=2))
    with serve_in_thread(fake) as url:
        slow = make_config(
            upstreams=[
                {"name": "slow", "base_url": url + "/v1", "models": ["gpt-4.1"], "timeout_s": 0.2}
            ]
        )
        gateway = Gateway(slow)
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                response = await client.post("/v1/chat/completions", json=CHAT)
        finally:
            await gateway.proxy.aclose()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


@pytest.fixture
def served_fake() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=50, chunk_delay_s=0.01))
    with serve_in_thread(fake) as url:
        yield fake, url


@pytest.fixture(params=["asyncio", "anyio"])
def watcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which disconnect watcher the relay uses: a plain asyncio task, or (as on trio) an anyio
    task group."""
    if request.param == "anyio":
        monkeypatch.setattr(proxy_relay, "_asyncio_task", lambda: None)
    return str(request.param)


async def test_client_disconnect_mid_stream_closes_the_upstream(
    served_fake: tuple[FakeUpstream, str], watcher: str
) -> None:
    fake, url = served_fake
    gateway = Gateway(make_config(url + "/v1"))
    seen: dict[str, Any] = {}
    app = gateway.wrap(_capturing(gateway, seen))
    body = json.dumps({**CHAT, "stream": True}).encode()
    disconnect = anyio.Event()
    received: list[bytes] = []

    async def disconnected() -> Message:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    receive = receive_body_then(body, disconnected)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if len(received) == 3:
                disconnect.set()

    try:
        with anyio.fail_after(5):
            await app(stream_scope(), receive, send)
            while fake.stats.in_flight:
                await anyio.sleep(0.01)
    finally:
        await gateway.proxy.aclose()
    ctx = seen["ctx"]
    assert ctx.outcome == Outcome.CLIENT_DISCONNECTED
    record = next(iter(fake.stats.by_request_id.values()))
    assert record.outcome == "client_disconnected"
    assert record.completion_tokens < 50
    assert ctx.usage.estimated
    assert ctx.usage.output_tokens >= 2


async def test_upstream_failing_mid_stream_ends_the_stream_cleanly(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    fake, url = served_fake
    fake.config.fail_stream_after = 3
    fake.config.chunk_delay_s = 0
    gateway = Gateway(make_config(url + "/v1"))
    try:
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    finally:
        await gateway.proxy.aclose()
    events = _events(response.text)
    assert response.status_code == 200
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert contents.count("tok ") == 3


def test_official_sdk_completion_stream_models_and_auth_error() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=6))
    with serve_in_thread(fake) as upstream_url:
        gateway = Gateway(make_config(upstream_url + "/v1"))
        with (
            serve_in_thread(gateway.asgi_app(), lifespan="on") as gateway_url,
            openai.OpenAI(
                base_url=gateway_url + "/v1", api_key=KEYS["acme"], max_retries=0
            ) as client,
            openai.OpenAI(base_url=gateway_url + "/v1", api_key="sk-wrong", max_retries=0) as bad,
        ):
            completion = client.chat.completions.create(
                model="gpt-4.1", messages=[{"role": "user", "content": "Say hi"}]
            )
            assert completion.choices[0].message.content
            assert completion.usage is not None
            assert completion.usage.completion_tokens == 6

            pieces = [
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model="gpt-4.1", messages=[{"role": "user", "content": "Say hi"}], stream=True
                )
                if chunk.choices
            ]
            assert "".join(pieces) == "tok " * 6

            models = [m.id for m in client.models.list()]
            assert "gpt-4.1" in models

            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(
                    model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
                )
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "x"}]
                )


async def test_healthz_needs_no_key() -> None:
    gateway, _ = in_process_gateway()
    async with client_for(gateway.asgi_app()) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_embeddings_and_legacy_completions_are_relayed() -> None:
    gateway, fake = in_process_gateway()
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        embedding = await client.post("/v1/embeddings", json={"model": "gpt-4.1", "input": "hello"})
        missing = await client.post("/v1/embeddings", json={"model": "gpt-4.1"})
        legacy = await client.post("/v1/completions", json={"model": "gpt-4.1", "prompt": "Once"})
    assert embedding.status_code == 200
    assert embedding.json()["data"][0]["embedding"]
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "input"
    assert legacy.status_code == 200
    assert legacy.json()["usage"]["completion_tokens"] > 0
    assert fake.stats.requests == 2


def _with_timeout(url: str, idle_s: float, total_s: float = 60.0) -> Any:
    return make_config(
        url + "/v1",
        upstreams=[
            {
                "name": "fake",
                "base_url": url + "/v1",
                "models": ["gpt-4.1"],
                "idle_timeout_s": idle_s,
                "timeout_s": total_s,
            }
        ],
    )


async def test_outer_cancellation_of_a_stream_is_not_taken_for_a_disconnect(
    served_fake: tuple[FakeUpstream, str], watcher: str
) -> None:
    """The relay swallows only the cancellation its own watcher caused."""
    fake, url = served_fake
    gateway = Gateway(make_config(url + "/v1"))
    body = json.dumps({**CHAT, "stream": True}).encode()
    received: list[bytes] = []
    first = anyio.Event()

    async def never() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    receive = receive_body_then(body, never)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            first.set()

    try:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                await gateway.wrap(gateway.proxy)(stream_scope(), receive, send)
                received.append(b"returned")  # only if the cancellation was swallowed

            group.start_soon(run)
            with anyio.fail_after(5):
                await first.wait()
            group.cancel_scope.cancel()
        with anyio.fail_after(5):
            while fake.stats.in_flight:
                await anyio.sleep(0.01)
    finally:
        await gateway.proxy.aclose()
    assert b"returned" not in received
    assert len(received) < 50


async def test_a_failing_receive_cuts_the_stream_and_is_raised(
    served_fake: tuple[FakeUpstream, str], watcher: str
) -> None:
    _fake, url = served_fake
    gateway = Gateway(make_config(url + "/v1"))
    body = json.dumps({**CHAT, "stream": True}).encode()
    received: list[bytes] = []

    async def broken() -> Message:
        await anyio.sleep(0.05)
        raise RuntimeError("receive broke")

    receive = receive_body_then(body, broken)

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])

    raised = ""
    try:
        with anyio.fail_after(5):
            await gateway.wrap(gateway.proxy)(stream_scope(), receive, send)
    except* RuntimeError as group:  # naked on asyncio, in a group from an anyio task group
        raised = repr(group.exceptions)
    finally:
        await gateway.proxy.aclose()
    assert "receive broke" in raised
    assert len(received) < 50


async def test_upstream_stalling_mid_stream_times_out(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    """The idle timeout of a streamed body (one watchdog per stream on aiohttp) still fires
    between chunks; the next request on the pooled connection has its own timeout again."""
    fake, url = served_fake
    fake.config.stream_chunks = 3
    fake.config.chunk_delay_s = 1.0
    # A whole answer's headers wait for the total (0.5 s), a stream's next event for 0.2 s.
    gateway = Gateway(_with_timeout(url, 0.2, total_s=0.5))
    seen: dict[str, Any] = {}
    try:
        async with client_for(gateway.wrap(_capturing(gateway, seen)), KEYS["acme"]) as client:
            with anyio.fail_after(5):
                response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            stalled_ctx = seen["ctx"]
            fake.config.chunk_delay_s = 0
            fake.config.latency_s = 1.0
            with anyio.fail_after(5):
                slow_json = await client.post("/v1/chat/completions", json=CHAT)
    finally:
        await gateway.proxy.aclose()
    events = _events(response.text)
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_error"
    assert error["message"] == "The upstream stopped sending in time."
    assert "tok " not in response.text
    assert stalled_ctx.outcome == Outcome.UPSTREAM_ERROR
    assert slow_json.status_code == 504


async def test_a_steady_stream_longer_than_the_read_timeout_completes(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    fake, url = served_fake
    fake.config.stream_chunks = 8
    fake.config.chunk_delay_s = 0.05
    gateway = Gateway(_with_timeout(url, 0.2))
    seen: dict[str, Any] = {}
    try:
        async with client_for(gateway.wrap(_capturing(gateway, seen)), KEYS["acme"]) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    finally:
        await gateway.proxy.aclose()
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    assert response.text.count("tok ") == 8
    ctx = seen["ctx"]
    assert ctx.outcome == Outcome.OK
    assert not ctx.usage.estimated
    assert ctx.usage.output_tokens == 8


@pytest.mark.parametrize("fast_path", [True, False], ids=["http11", "aiohttp"])
async def test_the_last_event_and_the_end_of_a_stream_leave_in_one_message(
    served_fake: tuple[FakeUpstream, str], fast_path: bool
) -> None:
    """The fake upstream writes its finish, usage and ``[DONE]`` with the end of its body:
    the relay sends them as the response's last message (one write), not followed by an
    empty one, whichever client read them."""
    fake, url = served_fake
    fake.config.stream_chunks = 3
    gateway = Gateway(make_config(url + "/v1", gateway={"upstream_fast_path": fast_path}))
    seen: dict[str, Any] = {}
    app = gateway.wrap(_capturing(gateway, seen))
    body = json.dumps({**CHAT, "stream": True}).encode()
    done = anyio.Event()
    bodies: list[tuple[bytes, bool]] = []

    async def disconnected() -> Message:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            bodies.append((message.get("body", b""), message.get("more_body", False)))
            if not message.get("more_body", False):
                done.set()

    try:
        with anyio.fail_after(5):
            await app(stream_scope(), receive_body_then(body, disconnected), send)
    finally:
        await gateway.proxy.aclose()
    last, more = bodies[-1]
    assert not more
    assert last.endswith(b"data: [DONE]\n\n")
    assert all(more for _, more in bodies[:-1])
    assert b"".join(part for part, _ in bodies).count(b'"content":"tok "') == 3
    assert seen["ctx"].outcome == Outcome.OK
    assert seen["ctx"].usage.output_tokens == 3


async def test_a_stream_is_relayed_from_a_task_of_its_own_that_sees_the_request_context(
    served_fake: tuple[FakeUpstream, str],
) -> None:
    """Events resume the relay's own task, not the whole ASGI stack's chain of coroutines;
    that task runs in a copy of the request's context (bound log fields, usage bounds)."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="")
    fake, url = served_fake
    fake.config.stream_chunks = 3
    gateway = Gateway(make_config(url + "/v1"))
    body = json.dumps({**CHAT, "stream": True}).encode()
    done = anyio.Event()
    seen: list[tuple[bool, str]] = []
    app_task: list[asyncio.Task[Any] | None] = []

    async def app(scope: Scope, receive: Receive, send: Any) -> None:
        marker.set("request")
        app_task.append(asyncio.current_task())
        await gateway.proxy(scope, receive, send)

    async def disconnected() -> Message:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            seen.append((asyncio.current_task() is app_task[0], marker.get()))
            if not message.get("more_body", False):
                done.set()

    try:
        with anyio.fail_after(5):
            await gateway.wrap(app)(stream_scope(), receive_body_then(body, disconnected), send)
    finally:
        await gateway.proxy.aclose()
    assert seen
    assert all(not same_task and value == "request" for same_task, value in seen)
