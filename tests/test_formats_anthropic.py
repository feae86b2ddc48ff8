"""Translation between Anthropic's Messages API and OpenAI chat completions, function by
function: requests both ways, answers, stream event sequences, errors and usage."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantware.context import Usage
from tenantware.errors import GatewayError
from tenantware.formats import anthropic as fmt
from tenantware.formats.sse import EventSplitter, parse_event
from tenantware.metering.usage import UsageBounds

BOUNDS = UsageBounds()
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}


def events(raw: bytes) -> list[tuple[str, dict[str, Any] | str]]:
    """``(event name, JSON data)`` of every event of an SSE byte string."""
    out: list[tuple[str, dict[str, Any] | str]] = []
    splitter = EventSplitter()
    for event in [*splitter.feed(raw), *splitter.flush()]:
        name, data = parse_event(event)
        out.append((name.decode(), json.loads(data) if data.startswith(b"{") else data.decode()))
    return out


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c).encode()) + b"\n\n"
        for c in chunks
    )


def named(*pairs: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(
        b"event: " + n.encode() + b"\ndata: " + json.dumps(d).encode() + b"\n\n" for n, d in pairs
    )


# -- requests ---------------------------------------------------------------------------------


def test_anthropic_request_becomes_openai_with_system_tools_images_and_results() -> None:
    body = {
        "model": "claude",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "metadata": {"user_id": "u1"},
        "tools": [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, IMAGE]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "tu1", "name": "lookup", "input": {"q": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "tu1", "content": "42"},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
    }
    out = fmt.request_to_openai(body, "gpt-up")
    assert out["model"] == "gpt-up"
    assert out["max_tokens"] == 100
    assert out["stop"] == ["END"]
    assert out["temperature"] == 0.5
    assert out["user"] == "u1"
    assert out["tool_choice"] == "required"
    assert out["parallel_tool_calls"] is False
    assert out["stream_options"] == {"include_usage": True}
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "lookup", "description": "d", "parameters": {"type": "object"}},
        }
    ]
    system, user, assistant, tool, user2 = out["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBO"},
    }
    assert assistant["content"] == "calling"
    assert assistant["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q":1}'}
    assert tool == {"role": "tool", "tool_call_id": "tu1", "content": "42"}
    assert user2 == {"role": "user", "content": [{"type": "text", "text": "thanks"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking"),
        ({"top_k": 5}, "top_k"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}]}
                ]
            },
            "messages[0].content[0]",
        ),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ],
)
def test_untranslatable_anthropic_parameters_are_refused_by_name(
    body: dict[str, Any], param: str
) -> None:
    request = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(GatewayError) as caught:
        fmt.request_to_openai({**request, **body}, "gpt")
    assert caught.value.status == 400
    assert caught.value.param == param
    assert param in caught.value.message


def test_openai_request_becomes_anthropic() -> None:
    body = {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "see"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                    {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "refusal": None,  # as the openai SDK's message objects echo it
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        ],
        "max_completion_tokens": 50,
        "stop": "END",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = fmt.request_from_openai(body, "claude-up")
    assert out["model"] == "claude-up"
    assert out["max_tokens"] == 50
    assert out["system"] == [{"type": "text", "text": "Be brief."}]
    assert out["stop_sequences"] == ["END"]
    assert out["tool_choice"] == {"type": "tool", "name": "f", "disable_parallel_tool_use": True}
    assert out["metadata"] == {"user_id": "u1"}
    assert out["stream"] is True
    assert "stream_options" not in out
    user, assistant, results = out["messages"]
    assert user["content"][1]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "iVBO",
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://x.example/a.png"}
    assert [b["input"] for b in assistant["content"]] == [{}, {"a": 1}]
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "r1"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "r2"},
        ],
    }
    assert fmt.request_from_openai({"messages": []}, "m")["max_tokens"] == fmt.DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 1.5}, "temperature"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "late"},
                ]
            },
            "messages[1]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "a", "name": "bob"}]}, "messages[0].name"),
    ],
)
def test_untranslatable_openai_parameters_are_refused_by_name(
    body: dict[str, Any], param: str
) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(GatewayError) as caught:
        fmt.request_from_openai({**request, **body}, "claude")
    assert caught.value.status == 400
    assert caught.value.param == param


# Messages both formats can say: text turns, tool calls with object arguments, tool results.
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
_tool_call = st.builds(
    lambda i, name, args: {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, separators=(",", ":"))},
    },
    st.integers(0, 999),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(), max_size=3),
)
_turn = st.one_of(
    st.builds(lambda t: [{"role": "user", "content": t}], _text),
    st.builds(lambda t: [{"role": "assistant", "content": t}], _text.filter(bool)),
    st.builds(
        lambda calls: [
            {"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in calls),
        ],
        st.lists(_tool_call, min_size=1, max_size=3),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    system=st.one_of(st.none(), _text.filter(bool)),
    turns=st.lists(_turn, min_size=1, max_size=6),
    max_tokens=st.integers(1, 100_000),
    temperature=st.one_of(st.none(), st.floats(0, 1)),
    stop=st.one_of(st.none(), st.lists(_text.filter(bool), min_size=1, max_size=4)),
    stream=st.booleans(),
)
def test_openai_to_anthropic_to_openai_preserves_shared_fields(
    system: str | None,
    turns: list[list[dict[str, Any]]],
    max_tokens: int,
    temperature: float | None,
    stop: list[str] | None,
    stream: bool,
) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages.extend(turn)
    body: dict[str, Any] = {"model": "m", "messages": messages, "max_tokens": max_tokens}
    if temperature is not None:
        body["temperature"] = temperature
    if stop is not None:
        body["stop"] = stop
    if stream:
        body["stream"] = True
    back = fmt.request_to_openai(fmt.request_from_openai(body, "m"), "m")
    assert back.pop("stream_options", None) == ({"include_usage": True} if stream else None)
    expected = {**body, "messages": [_normal(m) for m in messages]}
    assert back == expected


def _normal(message: dict[str, Any]) -> dict[str, Any]:
    """How a message comes back: an assistant's tool calls without text have ``content: None``."""
    if message["role"] == "assistant" and "tool_calls" in message:
        return {**message, "content": None}
    return message


# -- answers ----------------------------------------------------------------------------------


def test_anthropic_message_becomes_openai_completion_with_thinking_and_tool_calls() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "tu1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 30,
        },
    }
    usage = fmt.parse_json_usage(json.dumps(message).encode(), BOUNDS)
    assert usage == Usage(input_tokens=60, output_tokens=5, cached_tokens=20, cache_write_tokens=30)
    out = fmt.response_to_openai(message, usage)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Hi"
    assert choice["message"]["reasoning_content"] == "hmm"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert out["usage"]["prompt_tokens"] == 60
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 20}


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons_map_to_finish_reasons(stop: str, finish: str) -> None:
    out = fmt.response_to_openai({"content": [], "stop_reason": stop}, None)
    assert out["choices"][0]["finish_reason"] == finish


def test_openai_completion_becomes_anthropic_message() -> None:
    completion = {
        "model": "gpt",
        "choices": [
            {
                "message": {
                    "content": "Hi",
                    "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a":1}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    usage = Usage(input_tokens=50, output_tokens=7, cached_tokens=20)
    out = fmt.response_from_openai(completion, usage, "msg_x")
    assert out["id"] == "msg_x"
    assert out["stop_reason"] == "tool_use"
    assert out["content"] == [
        {"type": "text", "text": "Hi"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
    ]
    assert out["usage"] == {
        "input_tokens": 30,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 20,
        "output_tokens": 7,
    }


# -- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"input_tokens": -5, "output_tokens": 3}, Usage(0, 3, anomalies=("negative",))),
        (
            {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": "x"},
            Usage(0, 2, anomalies=("malformed",)),
        ),
        (
            {"input_tokens": 10**12, "output_tokens": 2},
            Usage(1_000_000_000, 2, anomalies=("too_large",)),
        ),
    ],
)
def test_untrusted_anthropic_usage_is_clamped(raw: dict[str, Any], expected: Usage) -> None:
    assert fmt.checked_anthropic_usage(raw, BOUNDS) == expected


# -- streams ----------------------------------------------------------------------------------


def test_openai_stream_becomes_anthropic_event_sequence() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "model": "gpt"}
    upstream = sse(
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a"'},
                            }
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
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                }
            ],
        },
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            **head,
            "choices": [],
            "usage": {
                "prompt_tokens": 9,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 2},
            },
        },
        "[DONE]",
    )
    tap = fmt.ToAnthropicStream("msg_1", "gpt-4.1")
    # Fed in awkward pieces: events cut anywhere must come out whole.
    out = b"".join(tap.feed(upstream[i : i + 7]) for i in range(0, len(upstream), 7))
    out += tap.flush()
    got = events(out)
    assert [name for name, _ in got] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert got[0][1]["message"]["id"] == "msg_1"  # type: ignore[index]
    assert got[6][1]["content_block"] == {  # type: ignore[index]
        "type": "tool_use",
        "id": "c1",
        "name": "f",
        "input": {},
    }
    partial = "".join(d["delta"]["partial_json"] for _, d in got[7:9])  # type: ignore[index]
    assert json.loads(partial) == {"a": 1}
    delta = got[10][1]
    assert delta["delta"]["stop_reason"] == "tool_use"  # type: ignore[index]
    assert delta["usage"] == {  # type: ignore[index]
        "input_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 2,
        "output_tokens": 4,
    }
    assert tap.usage == Usage(9, 4, 2)


def anthropic_stream(*, tool: bool = True, thinking: bool = False) -> bytes:
    pairs: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_9",
                    "model": "claude",
                    "usage": {
                        "input_tokens": 10,
                        "cache_read_input_tokens": 5,
                        "cache_creation_input_tokens": 3,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        ("ping", {"type": "ping"}),
    ]
    index = 0
    if thinking:
        pairs += [
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "hmm"},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "signature_delta", "signature": "sig"},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ]
        index = 1
    pairs += [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": "Hi"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]
    if tool:
        pairs += [
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index + 1,
                    "content_block": {"type": "tool_use", "id": "tu", "name": "f", "input": {}},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index + 1,
                    "delta": {"type": "input_json_delta", "partial_json": '{"a":1}'},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": index + 1}),
        ]
    pairs += [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use" if tool else "end_turn"},
                "usage": {"output_tokens": 6},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return named(*pairs)


def test_anthropic_stream_becomes_openai_chunks_with_usage_when_asked() -> None:
    tap = fmt.ToOpenAIStream(include_usage=True)
    raw = anthropic_stream()
    out = b"".join(tap.feed(raw[i : i + 11]) for i in range(0, len(raw), 11)) + tap.flush()
    got = events(out)
    assert got[-1] == ("", "[DONE]")
    chunks = [data for _, data in got[:-1]]
    assert all(isinstance(c, dict) for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]  # type: ignore[index]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == "Hi"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"] == "tu"
    assert calls[0]["function"]["name"] == "f"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"a":1}'
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]  # type: ignore[index]
    assert finish[-1] == "tool_calls"
    usage = chunks[-1]["usage"]  # type: ignore[index]
    assert usage["prompt_tokens"] == 18
    assert usage["completion_tokens"] == 6
    assert usage["prompt_tokens_details"] == {"cached_tokens": 5}
    assert tap.usage == Usage(18, 6, 5, cache_write_tokens=3)
    assert chunks[0]["id"] == "chatcmpl-msg_9"  # type: ignore[index]

    quiet = fmt.ToOpenAIStream(include_usage=False)
    quiet_out = events(quiet.feed(raw) + quiet.flush())
    assert all("usage" not in data for _, data in quiet_out if isinstance(data, dict))
    assert quiet.usage == Usage(18, 6, 5, cache_write_tokens=3)


def test_native_anthropic_stream_is_relayed_intact_with_thinking_and_usage_tapped() -> None:
    raw = anthropic_stream(thinking=True)
    tap = fmt.AnthropicStreamTap()
    out = b"".join(tap.feed(raw[i : i + 5]) for i in range(0, len(raw), 5)) + tap.flush()
    assert out == raw
    assert tap.usage == Usage(18, 6, 5, cache_write_tokens=3)
    assert tap.model == "claude"
    assert tap.estimated_output_tokens() > 0


def test_anthropic_stream_error_event_becomes_openai_error_chunk() -> None:
    tap = fmt.ToOpenAIStream(include_usage=False)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    got = events(tap.feed(named(("error", error))))
    assert got == [
        (
            "",
            {
                "error": {
                    "message": "busy",
                    "type": "overloaded_error",
                    "param": None,
                    "code": "overloaded_error",
                }
            },
        )
    ]


# -- errors -----------------------------------------------------------------------------------


def test_errors_translate_both_ways() -> None:
    openai_error = b'{"error":{"message":"slow down","type":"requests","param":null,"code":"x"}}'
    converted = msgspec.json.decode(fmt.error_to_anthropic(429, openai_error, "req_1"))
    assert converted == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
        "request_id": "req_1",
    }
    anthropic_error = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    back = msgspec.json.decode(fmt.error_to_openai(529, anthropic_error))
    assert back["error"]["message"] == "busy"
    assert back["error"]["type"] == "overloaded_error"
    assert fmt.error_to_openai(502, b"<html>") == b"<html>"
