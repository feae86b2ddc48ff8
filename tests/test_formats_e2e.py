"""Anthropic's Messages API end to end: the official ``anthropic`` and ``openai`` SDKs against
the whole gateway on loopback, with one OpenAI-compatible and one Anthropic-native fake
upstream. Every layer runs (tenant, quota, admission, breaker, metering); the ledger is
compared with what the upstream reported."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tenantware import Gateway, KeyHasher, parse_config
from tenantware.formats.anthropic import ANTHROPIC_VERSION
from tenantware.metering.ledger.base import MemoryLedger
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.pricing import cost_nanousd
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import TOKEN_TEXT, TOOL_INPUT, FakeUpstream, FakeUpstreamConfig
from tests.support import KEYS, tenant_entries

UPSTREAM_KEY = "sk-ant-upstream-secret"
TINY_KEY = "sk-test-tiny"
CLAUDE = "claude-sonnet-4.5"
GPT = "gpt-4.1"
TOOLS = [{"name": "lookup", "description": "Look it up.", "input_schema": {"type": "object"}}]
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
]
HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass
class Stack:
    gateway: Gateway
    url: str
    openai_fake: FakeUpstream
    anthropic_fake: FakeUpstream
    #: SDK clients made by the test, closed when the stack stops (an unclosed connection
    #: pool would warn whenever it is collected, in whichever test that happens).
    clients: list[anthropic.Anthropic | openai.OpenAI] = field(default_factory=list)

    def anthropic(self, key: str = KEYS["acme"], retries: int = 0) -> anthropic.Anthropic:
        client = anthropic.Anthropic(
            base_url=self.url, api_key=key, max_retries=retries, timeout=10
        )
        self.clients.append(client)
        return client

    def openai(self) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=10
        )
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    def record_of(self, request_id: str) -> UsageRecord:
        ledger = self.gateway.ledger
        assert isinstance(ledger, MemoryLedger)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for record in list(ledger.records.values()):
                if record.request_id == request_id:
                    return record
            time.sleep(0.01)
        raise AssertionError(f"no ledger record for {request_id}")

    def cost(self, record: UsageRecord, cache_write: int = 0) -> int:
        price = self.gateway.live.current.catalogue.price(record.model_served)
        assert price is not None
        return cost_nanousd(
            price, record.input_tokens, record.output_tokens, record.cached_tokens, cache_write
        )


@contextlib.contextmanager
def running(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Iterator[Stack]:
    monkeypatch.setenv("TW_TEST_ANTHROPIC_KEY", UPSTREAM_KEY)
    openai_fake = FakeUpstream()
    anthropic_fake = FakeUpstream(FakeUpstreamConfig(require_api_key=UPSTREAM_KEY))
    tenants = tenant_entries()
    tenants.append(
        {
            "id": "tiny",
            "tier": "enterprise",
            "limits": {"requests_per_second": 1, "burst_multiplier": 1},
            "keys": [{"id": "tiny-1", "hash": KeyHasher().hash(TINY_KEY)}],
        }
    )
    # A loaded host may take a while to start three servers.
    with (
        serve_in_thread(openai_fake, startup_timeout_s=30) as oa_url,
        serve_in_thread(anthropic_fake, startup_timeout_s=30) as an_url,
    ):
        data: dict[str, Any] = {
            "tenants": tenants,
            "upstreams": [
                {
                    "name": "openai-fake",
                    "base_url": oa_url + "/v1",
                    "models": [GPT, "gemini-2.5-flash"],
                    "timeout_s": 5,
                },
                {
                    "name": "anthropic-fake",
                    "api": "anthropic",
                    "base_url": an_url + "/v1",
                    "api_key_env": "TW_TEST_ANTHROPIC_KEY",
                    "models": [CLAUDE],
                    "timeout_s": 5,
                },
            ],
            "metering": {"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.02},
        }
        data.update(overrides)
        gateway = Gateway(parse_config(data))
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            running_stack = Stack(gateway, url, openai_fake, anthropic_fake)
            try:
                yield running_stack
            finally:
                running_stack.close_clients()


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    with running(monkeypatch) as running_stack:
        yield running_stack


# -- Anthropic client, Anthropic upstream: relayed -------------------------------------------


def test_anthropic_sdk_native_create_is_relayed_and_billed_with_cache_tokens(stack: Stack) -> None:
    stack.anthropic_fake.config.cache_read_tokens = 100
    stack.anthropic_fake.config.cache_creation_tokens = 40
    message = stack.anthropic().messages.create(
        model=CLAUDE,
        max_tokens=20,
        system="Be brief.",
        messages=HELLO,
        extra_headers={
            "x-request-id": "native-1",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "test-beta-1",
        },
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == TOKEN_TEXT * 5
    assert message.stop_reason == "end_turn"
    assert message.usage.cache_read_input_tokens == 100
    assert message.usage.cache_creation_input_tokens == 40
    seen = stack.anthropic_fake.last_request
    assert seen is not None
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "[redacted]"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == "test-beta-1"
    assert "authorization" not in seen.headers
    assert seen.json()["system"] == "Be brief."

    record = stack.record_of("native-1")
    assert (record.model_served, record.upstream) == (CLAUDE, "anthropic-fake")
    upstream = stack.anthropic_fake.stats.by_request_id["native-1"]
    assert record.input_tokens == upstream.prompt_tokens == message.usage.input_tokens + 140
    assert record.output_tokens == message.usage.output_tokens == 5
    assert record.cached_tokens == 100
    assert record.cost_nanousd == stack.cost(record, cache_write=40)
    # The cache write is billed at its own price, above the input price.
    assert record.cost_nanousd > stack.cost(record)


def test_anthropic_sdk_native_stream_with_tool_use(stack: Stack) -> None:
    stack.anthropic_fake.config.tool_use = True
    with stack.anthropic().messages.stream(
        model=CLAUDE,
        max_tokens=20,
        messages=HELLO,
        tools=TOOLS,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "native-stream-1"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TOKEN_TEXT * 5
    assert final.stop_reason == "tool_use"
    tool = final.content[-1]
    assert tool.type == "tool_use"
    assert tool.name == "lookup"
    assert tool.input == TOOL_INPUT
    record = stack.record_of("native-stream-1")
    assert record.stream
    assert (record.model_served, record.upstream) == (CLAUDE, "anthropic-fake")
    assert record.input_tokens == final.usage.input_tokens
    assert record.output_tokens == final.usage.output_tokens == 5
    assert not record.estimated


def test_count_tokens_is_answered_by_the_gateway(stack: Stack) -> None:
    counted = stack.anthropic().messages.count_tokens(model=CLAUDE, messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    assert stack.anthropic_fake.stats.requests == 0


# -- Anthropic client, OpenAI upstream: translated --------------------------------------------


def test_anthropic_sdk_reaches_openai_upstream(stack: Stack) -> None:
    stack.openai_fake.config.tool_use = True
    message = stack.anthropic().messages.create(
        model=GPT,
        max_tokens=20,
        system="Be brief.",
        messages=HELLO,
        tools=TOOLS,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "to-openai-1"},
    )
    sent = stack.openai_fake.last_request
    assert sent is not None
    assert sent.path == "/v1/chat/completions"
    body = sent.json()
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["tools"][0]["function"]["name"] == "lookup"
    assert [block.type for block in message.content] == ["text", "tool_use"]
    assert message.content[1].input == TOOL_INPUT  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    upstream = stack.openai_fake.stats.by_request_id["to-openai-1"]
    assert message.usage.input_tokens == upstream.prompt_tokens
    assert message.usage.output_tokens == upstream.completion_tokens
    record = stack.record_of("to-openai-1")
    assert (record.model_served, record.upstream) == (GPT, "openai-fake")
    assert (record.input_tokens, record.output_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    assert record.cost_nanousd == stack.cost(record)


def test_anthropic_sdk_streams_from_openai_upstream(stack: Stack) -> None:
    stack.openai_fake.config.tool_use = True
    with stack.anthropic().messages.stream(
        model=GPT,
        max_tokens=20,
        messages=HELLO,
        tools=TOOLS,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "to-openai-stream-1"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TOKEN_TEXT * 5
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == TOOL_INPUT  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    upstream = stack.openai_fake.stats.by_request_id["to-openai-stream-1"]
    assert final.usage.input_tokens == upstream.prompt_tokens
    assert final.usage.output_tokens == upstream.completion_tokens
    record = stack.record_of("to-openai-stream-1")
    assert record.stream
    assert (record.input_tokens, record.output_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    assert not record.estimated


def test_untranslatable_parameter_is_a_400_naming_it(stack: Stack) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        stack.anthropic().messages.create(
            model=GPT,
            max_tokens=2000,
            messages=HELLO,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "`thinking`" in caught.value.message
    assert stack.openai_fake.stats.requests == 0


# -- OpenAI client, Anthropic upstream: translated --------------------------------------------


def test_openai_sdk_reaches_anthropic_upstream(stack: Stack) -> None:
    stack.anthropic_fake.config.tool_use = True
    stack.anthropic_fake.config.cache_read_tokens = 8
    completion = stack.openai().chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],  # type: ignore[list-item]
        max_tokens=20,
        tools=OPENAI_TOOLS,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "to-anthropic-1"},
    )
    sent = stack.anthropic_fake.last_request
    assert sent is not None
    assert sent.path == "/v1/messages"
    assert sent.json()["system"] == [{"type": "text", "text": "Be brief."}]
    assert sent.headers["anthropic-version"] == ANTHROPIC_VERSION
    assert sent.headers["x-api-key"] == "[redacted]"
    choice = completion.choices[0]
    assert choice.message.content == TOKEN_TEXT * 5
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == TOOL_INPUT  # type: ignore[union-attr]
    upstream = stack.anthropic_fake.stats.by_request_id["to-anthropic-1"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == upstream.prompt_tokens
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 8
    record = stack.record_of("to-anthropic-1")
    assert (record.model_served, record.upstream) == (CLAUDE, "anthropic-fake")
    assert (record.input_tokens, record.output_tokens, record.cached_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
        8,
    )
    assert record.cost_nanousd == stack.cost(record)


def test_openai_sdk_streams_from_anthropic_upstream(stack: Stack) -> None:
    stack.anthropic_fake.config.tool_use = True
    chunks = list(
        stack.openai().chat.completions.create(
            model=CLAUDE,
            messages=HELLO,  # type: ignore[arg-type]
            tools=OPENAI_TOOLS,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "to-anthropic-stream-1"},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TOKEN_TEXT * 5
    arguments = "".join(
        call.function.arguments or ""
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or ()
        if call.function is not None
    )
    assert json.loads(arguments) == TOOL_INPUT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls"
    usage = chunks[-1].usage
    assert usage is not None
    upstream = stack.anthropic_fake.stats.by_request_id["to-anthropic-stream-1"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    record = stack.record_of("to-anthropic-stream-1")
    assert (record.input_tokens, record.output_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    assert (record.model_served, record.upstream) == (CLAUDE, "anthropic-fake")


def test_embeddings_for_an_anthropic_model_are_refused(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.openai().embeddings.create(model=CLAUDE, input="hi")
    assert caught.value.code == "unsupported_for_model"


# -- errors, as the anthropic SDK sees them ---------------------------------------------------


def test_invalid_key_is_an_authentication_error(stack: Stack) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        stack.anthropic(key="sk-wrong").messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_unknown_model_is_a_not_found_error(stack: Stack) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        stack.anthropic().messages.create(model="claude-nope", max_tokens=5, messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_quota_refusal_is_a_rate_limit_error_and_its_retry_is_honoured(stack: Stack) -> None:
    client = stack.anthropic(key=TINY_KEY)
    client.messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert float(caught.value.response.headers["retry-after"]) >= 1
    # The SDK's own retry waits as told and then gets through.
    retrying = stack.anthropic(key=TINY_KEY, retries=4)
    message = retrying.messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert message.content[0].text == TOKEN_TEXT * 5  # type: ignore[union-attr]


def test_upstream_error_reaches_the_anthropic_sdk_in_its_shape(stack: Stack) -> None:
    # max_tokens 0 passes the gateway; the OpenAI upstream refuses it in OpenAI's shape.
    with pytest.raises(anthropic.BadRequestError) as caught:
        stack.anthropic().messages.create(model=GPT, max_tokens=0, messages=HELLO)
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


# -- a fallback chain crossing formats --------------------------------------------------------


def test_fallback_from_anthropic_upstream_to_openai_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running(monkeypatch, breaker={"fallbacks": {CLAUDE: [GPT]}}) as stack:
        stack.anthropic_fake.config.fail_next = [529] * 10
        message = stack.anthropic().messages.create(
            model=CLAUDE,
            max_tokens=20,
            messages=HELLO,
            extra_headers={"x-request-id": "fallback-1"},
        )
        assert message.content[0].text == TOKEN_TEXT * 5  # type: ignore[union-attr]
        assert message.model == GPT
        record = stack.record_of("fallback-1")
        assert (record.model_requested, record.model_served, record.upstream) == (
            CLAUDE,
            GPT,
            "openai-fake",
        )
        assert record.cost_nanousd == stack.cost(record)
        assert stack.anthropic_fake.stats.by_status[529] >= 1


# -- a client leaving mid-stream, an upstream overloaded -------------------------------------


@pytest.mark.parametrize("model", [CLAUDE, GPT], ids=["native", "translated"])
def test_client_leaving_an_anthropic_stream_is_billed_like_an_openai_stream(
    stack: Stack, model: str
) -> None:
    """The OpenAI rule: the upstream's usage when it came, else the prompt estimate and the
    text relayed so far (``estimated``)."""
    fake = stack.anthropic_fake if model == CLAUDE else stack.openai_fake
    fake.config.stream_chunks = 200
    fake.config.chunk_delay_s = 0.02
    body = {"model": model, "max_tokens": 500, "stream": True, "messages": HELLO}
    headers = {"x-api-key": KEYS["acme"], "x-request-id": f"leave-{model}"}
    with (
        httpx.Client(base_url=stack.url, timeout=10) as client,
        client.stream("POST", "/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        deltas = 0
        for line in response.iter_lines():
            if line.startswith("event: content_block_delta"):
                deltas += 1
            if deltas >= 5:
                break
    record = stack.record_of(f"leave-{model}")
    deadline = time.monotonic() + 5.0
    while fake.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    produced = fake.stats.by_request_id[f"leave-{model}"]
    assert produced.outcome != "completed"
    assert record.outcome == "client_disconnected"
    assert record.estimated
    assert record.stream
    assert 5 <= record.output_tokens <= produced.completion_tokens < 200
    assert record.input_tokens > 0
    assert record.cost_nanousd == stack.cost(record)


def test_overloaded_anthropic_upstream_is_an_overloaded_error(stack: Stack) -> None:
    stack.anthropic_fake.config.fail_next = [529] * 10
    with pytest.raises(anthropic.InternalServerError) as caught:
        stack.anthropic().messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    # Retried on the gateway's side first, as any 5xx.
    assert stack.anthropic_fake.stats.by_status[529] == 3


# -- the Responses API reaching an Anthropic upstream (through chat, both ways) ---------------


def test_openai_sdk_responses_reach_anthropic_upstream(stack: Stack) -> None:
    stack.anthropic_fake.config.tool_use = True
    stack.anthropic_fake.config.cache_read_tokens = 6
    client = stack.openai()
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    response = client.responses.create(
        model=CLAUDE,
        instructions="Be brief.",
        input="Hello there",
        max_output_tokens=20,
        tools=tools,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "responses-claude-1"},
    )
    sent = stack.anthropic_fake.last_request
    assert sent is not None
    assert sent.path == "/v1/messages"
    assert sent.json()["system"] == [{"type": "text", "text": "Be brief."}]
    assert response.output_text == TOKEN_TEXT * 5
    calls = [item for item in response.output if item.type == "function_call"]
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    upstream = stack.anthropic_fake.stats.by_request_id["responses-claude-1"]
    assert response.usage is not None
    assert response.usage.input_tokens == upstream.prompt_tokens
    assert response.usage.input_tokens_details.cached_tokens == 6
    record = stack.record_of("responses-claude-1")
    assert (record.input_tokens, record.output_tokens, record.cached_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
        6,
    )
    assert (record.model_served, record.upstream) == (CLAUDE, "anthropic-fake")

    with client.responses.stream(
        model=CLAUDE,
        input="Hello there",
        max_output_tokens=20,
        tools=tools,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "responses-claude-2"},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TOKEN_TEXT * 5
    calls = [item for item in final.output if item.type == "function_call"]
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    streamed = stack.record_of("responses-claude-2")
    upstream = stack.anthropic_fake.stats.by_request_id["responses-claude-2"]
    assert (streamed.input_tokens, streamed.output_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    assert not streamed.estimated
