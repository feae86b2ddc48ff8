"""OpenAI's Responses API translated for a chat-completions-only upstream: the translation
functions directly, then the official ``openai`` SDK's ``responses`` calls through the whole
gateway on loopback, billed exactly as the upstream reported."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantware import Gateway, parse_config
from tenantware.context import Usage
from tenantware.errors import GatewayError
from tenantware.formats import responses as fmt
from tenantware.formats.sse import EventSplitter, parse_event
from tenantware.metering.ledger.base import MemoryLedger
from tenantware.metering.ledger.record import UsageRecord
from tenantware.metering.pricing import cost_nanousd
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import TOKEN_TEXT, TOOL_INPUT, FakeUpstream, FakeUpstreamConfig
from tests.support import KEYS, tenant_entries

# -- translation ------------------------------------------------------------------------------


def test_request_becomes_chat_with_instructions_items_tools_and_format() -> None:
    body = {
        "model": "gpt",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            {
                "role": "user",
                "content": [{"type": "input_image", "image_url": "https://x.example/a.png"}],
            },
        ],
        "max_output_tokens": 50,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        "reasoning": {"effort": "low"},
        "stream": True,
    }
    out = fmt.request_to_chat(body, "gpt-up")
    assert out["model"] == "gpt-up"
    assert out["max_tokens"] == 50
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "look"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}],
        },
    ]
    assert out["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}},
    }
    assert out["reasoning_effort"] == "low"
    assert out["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ],
)
def test_untranslatable_parameters_are_refused_by_name(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        fmt.request_to_chat({"model": "m", "input": "hi", **extra}, "m")
    assert caught.value.status == 400
    assert caught.value.param == param


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
_item = st.one_of(
    st.builds(lambda t: {"role": "user", "content": t}, _text),
    st.builds(lambda t: {"role": "assistant", "content": t}, _text),
    st.builds(
        lambda i, a: {
            "type": "function_call",
            "call_id": f"c{i}",
            "name": "f",
            "arguments": json.dumps(a),
        },
        st.integers(0, 99),
        st.dictionaries(st.from_regex(r"[a-z]{1,4}", fullmatch=True), st.integers(), max_size=2),
    ),
    st.builds(
        lambda i, o: {"type": "function_call_output", "call_id": f"c{i}", "output": o},
        st.integers(0, 99),
        _text,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item, min_size=1, max_size=8))
def test_items_keep_their_order_text_and_calls(items: list[dict[str, Any]]) -> None:
    messages = fmt.request_to_chat({"model": "m", "input": items}, "m")["messages"]
    flat: list[tuple[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            flat.append(("output", (message["tool_call_id"], message["content"])))
        elif message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call["function"]
                flat.append(("call", (call["id"], function["name"], function["arguments"])))
        else:
            flat.append((message["role"], message["content"]))
    expected: list[tuple[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "function_call":
            expected.append(("call", (item["call_id"], item["name"], item["arguments"])))
        elif kind == "function_call_output":
            expected.append(("output", (item["call_id"], item["output"])))
        else:
            expected.append((item["role"], item["content"]))
    assert flat == expected


def test_chat_completion_becomes_a_response() -> None:
    completion = {
        "model": "gpt",
        "created": 7,
        "choices": [
            {
                "message": {
                    "content": "Hi",
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "length",
            }
        ],
    }
    out = fmt.response_from_chat(completion, Usage(10, 4, 3, 1), "resp_x")
    assert out["id"] == "resp_x"
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in out["output"]] == ["message", "function_call"]
    assert out["output"][0]["content"][0]["text"] == "Hi"
    assert out["output"][1]["call_id"] == "c1"
    assert out["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 3},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 14,
    }


def test_chat_stream_becomes_the_responses_event_sequence() -> None:
    head = {"id": "c", "model": "gpt"}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "He"}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "y"}}]},
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}
                        ]
                    },
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
                }
            ],
        },
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {**head, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}},
    ]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    raw += b"data: [DONE]\n\n"
    tap = fmt.ToResponsesStream("resp_1", "gpt-4.1")
    out = b"".join(tap.feed(raw[i : i + 9]) for i in range(0, len(raw), 9)) + tap.flush()
    splitter = EventSplitter()
    events = [parse_event(e) for e in [*splitter.feed(out), *splitter.flush()]]
    names = [name.decode() for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    bodies = [json.loads(data) for _, data in events]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    final = bodies[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hey"
    assert final["output"][1]["arguments"] == "{}"
    assert final["usage"]["input_tokens"] == 9
    assert tap.usage == Usage(9, 3)


def _checked_output(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items of a Responses event sequence, checked as OpenAI's stream keeps them:
    each item is added at the next ``output_index``, its deltas and parts name it while it is
    open, only one item is open at a time, and ``response.completed`` lists the finished items
    in order."""
    done: list[dict[str, Any]] = []
    open_at: int | None = None
    for body in bodies:
        kind = body["type"]
        if kind == "response.output_item.added":
            assert open_at is None, "an item was added while another was open"
            assert body["output_index"] == len(done)
            open_at = body["output_index"]
            open_item = body["item"]
        elif kind == "response.output_item.done":
            assert body["output_index"] == open_at
            assert body["item"]["id"] == open_item["id"]
            done.append(body["item"])
            open_at = None
        elif kind.startswith(("response.output_text.", "response.content_part.")):
            assert (body["output_index"], body["item_id"]) == (open_at, open_item["id"])
            assert open_item["type"] == "message"
        elif kind.startswith("response.function_call_arguments."):
            assert (body["output_index"], body["item_id"]) == (open_at, open_item["id"])
            assert open_item["type"] == "function_call"
        elif kind == "response.completed":
            assert open_at is None
            assert body["response"]["output"] == done
    assert len({item["id"] for item in done}) == len(done)
    return done


def test_text_after_a_tool_call_opens_a_new_message_item() -> None:
    head = {"id": "c", "model": "gpt"}
    call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}
    deltas = [{"content": "He"}, {"tool_calls": [call]}, {"content": "y"}, {"content": "!"}]
    chunks = [{**head, "choices": [{"index": 0, "delta": delta}]} for delta in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    tap = fmt.ToResponsesStream("resp_1", "gpt-4.1")
    out = tap.feed(raw + b"data: [DONE]\n\n") + tap.flush()
    splitter = EventSplitter()
    bodies = [json.loads(parse_event(e)[1]) for e in [*splitter.feed(out), *splitter.flush()]]
    output = _checked_output(bodies)
    assert [item["type"] for item in output] == ["message", "function_call", "message"]
    assert [item["content"][0]["text"] for item in (output[0], output[2])] == ["He", "y!"]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))


# -- end to end: the openai SDK's responses calls ---------------------------------------------


def _record_of(gateway: Gateway, request_id: str) -> UsageRecord:
    ledger = gateway.ledger
    assert isinstance(ledger, MemoryLedger)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for record in list(ledger.records.values()):
            if record.request_id == request_id:
                return record
        time.sleep(0.01)
    raise AssertionError(f"no ledger record for {request_id}")


@pytest.fixture
def served() -> Iterator[tuple[Gateway, str, FakeUpstream]]:
    fake = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(fake, startup_timeout_s=30) as upstream:
        data = {
            "tenants": tenant_entries(),
            "upstreams": [
                {"name": "chat-only", "base_url": upstream + "/v1", "models": ["gpt-4.1"]}
            ],
            "metering": {"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.02},
        }
        gateway = Gateway(parse_config(data))
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            yield gateway, url, fake


#: SDK clients of the running test, closed after it (an unclosed connection pool would warn
#: whenever it is collected, in whichever later test that happens).
_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    for client in _CLIENTS:
        client.close()
    _CLIENTS.clear()


def _client(url: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=10)
    _CLIENTS.append(client)
    return client


def _billed_as_reported(gateway: Gateway, fake: FakeUpstream, request_id: str) -> UsageRecord:
    record = _record_of(gateway, request_id)
    upstream = fake.stats.by_request_id[request_id]
    assert (record.input_tokens, record.output_tokens) == (
        upstream.prompt_tokens,
        upstream.completion_tokens,
    )
    assert (record.model_served, record.upstream) == ("gpt-4.1", "chat-only")
    price = gateway.live.current.catalogue.price("gpt-4.1")
    assert price is not None
    assert record.cost_nanousd == cost_nanousd(
        price, record.input_tokens, record.output_tokens, record.cached_tokens
    )
    return record


def test_sdk_responses_create_with_tools_and_structured_output(
    served: tuple[Gateway, str, FakeUpstream],
) -> None:
    gateway, url, fake = served
    fake.config.tool_use = True
    response = _client(url).responses.create(
        model="gpt-4.1",
        instructions="Be brief.",
        input="Hello there",
        max_output_tokens=20,
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],  # type: ignore[list-item]
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        extra_headers={"x-request-id": "responses-1"},
    )
    sent = fake.last_request
    assert sent is not None
    assert sent.path == "/v1/chat/completions"
    body = sent.json()
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["response_format"]["type"] == "json_schema"
    assert response.output_text == TOKEN_TEXT * 5
    calls = [item for item in response.output if item.type == "function_call"]
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    upstream = fake.stats.by_request_id["responses-1"]
    assert response.usage is not None
    assert response.usage.input_tokens == upstream.prompt_tokens
    assert response.usage.output_tokens == upstream.completion_tokens
    _billed_as_reported(gateway, fake, "responses-1")


def test_sdk_responses_stream(served: tuple[Gateway, str, FakeUpstream]) -> None:
    gateway, url, fake = served
    fake.config.tool_use = True
    with _client(url).responses.stream(
        model="gpt-4.1",
        input=[{"role": "user", "content": "Hello there"}],
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],  # type: ignore[list-item]
        extra_headers={"x-request-id": "responses-stream-1"},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TOKEN_TEXT * 5
    assert final.output_text == TOKEN_TEXT * 5
    calls = [item for item in final.output if item.type == "function_call"]
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    record = _billed_as_reported(gateway, fake, "responses-stream-1")
    assert record.stream
    assert not record.estimated


def test_sdk_responses_stream_with_text_after_the_tool_call(
    served: tuple[Gateway, str, FakeUpstream],
) -> None:
    gateway, url, fake = served
    fake.config.tool_use = fake.config.tool_call_mid_text = True
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    # The events as they are on the wire, then as the SDK assembles them.
    raw = httpx.post(
        url + "/v1/responses",
        json={"model": "gpt-4.1", "input": "Hello there", "tools": tools, "stream": True},
        headers={"authorization": f"Bearer {KEYS['acme']}", "x-request-id": "responses-stream-2"},
        timeout=10,
    )
    assert raw.status_code == 200
    splitter = EventSplitter()
    events = [*splitter.feed(raw.content), *splitter.flush()]
    output = _checked_output([json.loads(parse_event(event)[1]) for event in events])
    assert [item["type"] for item in output] == ["message", "function_call", "message"]
    assert "".join(item["content"][0]["text"] for item in (output[0], output[2])) == TOKEN_TEXT * 5
    _billed_as_reported(gateway, fake, "responses-stream-2")
    with _client(url).responses.stream(
        model="gpt-4.1",
        input="Hello there",
        tools=tools,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "responses-stream-3"},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == TOKEN_TEXT * 5
    assert [item.type for item in final.output] == ["message", "function_call", "message"]


@pytest.mark.parametrize("kind", ["translated", "native"])
def test_client_leaving_a_responses_stream_is_billed_like_a_chat_stream(
    kind: str, request: pytest.FixtureRequest
) -> None:
    gateway, url, fake = request.getfixturevalue("served" if kind == "translated" else "native")
    fake.config.stream_chunks = 200
    fake.config.chunk_delay_s = 0.02
    body = {"model": "gpt-4.1", "input": "Hello there", "stream": True}
    headers = {"authorization": f"Bearer {KEYS['acme']}", "x-request-id": f"leave-{kind}"}
    with (
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/responses", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        deltas = 0
        for line in response.iter_lines():
            if line == "event: response.output_text.delta":
                deltas += 1
            if deltas >= 5:
                break
    record = _record_of(gateway, f"leave-{kind}")
    deadline = time.monotonic() + 5.0
    while fake.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    produced = fake.stats.by_request_id[f"leave-{kind}"]
    assert record.outcome == "client_disconnected"
    assert record.estimated
    assert 5 <= record.output_tokens <= produced.completion_tokens < 200


def test_untranslatable_parameter_reaches_the_sdk_as_a_400(
    served: tuple[Gateway, str, FakeUpstream],
) -> None:
    _gateway, url, fake = served
    with pytest.raises(openai.BadRequestError) as caught:
        _client(url).responses.create(
            model="gpt-4.1", input="hi", previous_response_id="resp_earlier"
        )
    assert caught.value.param == "previous_response_id"
    assert fake.stats.requests == 0


# -- an upstream that serves the Responses API itself: relayed --------------------------------


@pytest.fixture
def native() -> Iterator[tuple[Gateway, str, FakeUpstream]]:
    fake = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(fake, startup_timeout_s=30) as upstream:
        data = {
            "tenants": tenant_entries(),
            "upstreams": [
                {
                    "name": "chat-only",
                    "base_url": upstream + "/v1",
                    "models": ["gpt-4.1"],
                    "responses": True,
                }
            ],
            "metering": {"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.02},
        }
        gateway = Gateway(parse_config(data))
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            yield gateway, url, fake


def test_native_responses_upstream_gets_the_request_as_sent(
    native: tuple[Gateway, str, FakeUpstream],
) -> None:
    gateway, url, fake = native
    fake.config.tool_use = True
    client = _client(url)
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    response = client.responses.create(
        model="gpt-4.1",
        input="Hello there",
        previous_response_id="resp_earlier",  # relayed untouched: the upstream keeps state
        tools=tools,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "native-responses-1"},
    )
    sent = fake.last_request
    assert sent is not None
    assert sent.path == "/v1/responses"
    assert sent.json()["previous_response_id"] == "resp_earlier"
    assert response.output_text == TOKEN_TEXT * 5
    calls = [item for item in response.output if item.type == "function_call"]
    assert json.loads(calls[0].arguments) == TOOL_INPUT
    _billed_as_reported(gateway, fake, "native-responses-1")

    with client.responses.stream(
        model="gpt-4.1",
        input="Hello there",
        tools=tools,  # type: ignore[arg-type]
        extra_headers={"x-request-id": "native-responses-2"},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TOKEN_TEXT * 5
    assert final.output_text == TOKEN_TEXT * 5
    record = _billed_as_reported(gateway, fake, "native-responses-2")
    assert record.stream
    assert not record.estimated


# -- the upstream failing mid-stream: billed by the chat rule, both upstream kinds ------------


@pytest.mark.parametrize("kind", ["translated", "native"])
def test_upstream_failing_mid_responses_stream_bills_what_was_relayed(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """The rule of ``test_metering.test_rule_upstream_error_mid_stream_bills_what_was_relayed``
    (``metering.billing``): an upstream error after output is billed for what was relayed."""
    gateway, url, fake = request.getfixturevalue("served" if kind == "translated" else "native")
    fake.config.fail_stream_after = 3
    body = {"model": "gpt-4.1", "input": "Hello there", "stream": True}
    headers = {"authorization": f"Bearer {KEYS['acme']}", "x-request-id": f"cut-{kind}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/v1/responses", json=body, headers=headers)
    assert response.status_code == 200
    events = [parse_event(e) for e in EventSplitter().feed(response.content)]
    relayed = sum(1 for name, _ in events if name == b"response.output_text.delta")
    assert relayed == 3
    name, data = events[-1]
    assert name == b"error"
    assert json.loads(data) == {
        "type": "error",
        "code": "upstream_error",
        "message": "The upstream stream was interrupted.",
        "param": None,
    }
    assert not any(name == b"response.completed" for name, _ in events)
    record = _record_of(gateway, f"cut-{kind}")
    assert record.outcome == "upstream_error"
    assert record.estimated
    assert record.output_tokens == relayed == fake.stats.completion_tokens
    price = gateway.live.current.catalogue.price("gpt-4.1")
    assert price is not None
    assert record.cost_nanousd == cost_nanousd(price, record.input_tokens, relayed) > 0
