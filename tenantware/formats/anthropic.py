"""Anthropic's Messages API and its translation to and from OpenAI chat completions.

Pure functions and small stream state machines, tested directly: requests both ways, JSON
answers both ways, SSE event sequences both ways, errors and usage. What one format says and
the other cannot (extended thinking sent to an OpenAI upstream, ``top_k``, ``n`` > 1, a
temperature above 1 for Anthropic, server tools) is refused with a 400 naming the parameter,
never dropped. ``cache_control`` hints are the one exception: they only steer Anthropic's
prompt cache (OpenAI-compatible upstreams cache on their own) and change no answer.

Usage: Anthropic's ``input_tokens`` excludes the prompt tokens read from and written to the
cache; the usage record counts all three as input (``cached_tokens`` the read part,
``cache_write_tokens`` the written part), as OpenAI's ``prompt_tokens`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from tenantware.context import Outcome, Usage
from tenantware.errors import GatewayError, anthropic_error_body, anthropic_error_type
from tenantware.estimate import estimate_text_tokens
from tenantware.formats.sse import (
    FromChatStream,
    TranslatingStream,
    json_object,
    parse_event,
    sse_event,
)
from tenantware.metering.usage import USAGE_BOUNDS, UsageBounds, checked_usage

__all__ = [
    "ANTHROPIC_VERSION",
    "AnthropicStreamTap",
    "ToAnthropicStream",
    "ToOpenAIStream",
    "checked_anthropic_usage",
    "error_to_anthropic",
    "error_to_openai",
    "parse_json_usage",
    "request_from_openai",
    "request_to_openai",
    "response_from_openai",
    "response_to_openai",
    "usage_json_anthropic",
    "usage_json_openai",
]

#: Sent to native Anthropic upstreams when the client named none.
ANTHROPIC_VERSION: Final = "2023-06-01"
#: Anthropic requires ``max_tokens``; an OpenAI request without a cap gets this one.
DEFAULT_MAX_TOKENS: Final = 4096

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

#: Anthropic ``stop_reason`` -> OpenAI ``finish_reason``, and back.
STOP_TO_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
FINISH_TO_STOP: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _refuse(param: str, why: str) -> GatewayError:
    return GatewayError(
        400,
        f"`{param}` cannot be translated for this model's upstream: {why}.",
        param=param,
        code="untranslatable_parameter",
        outcome=Outcome.REJECTED_REQUEST,
    )


def _text_of(blocks: Any, param: str) -> str:
    """The text of a string or a list of text blocks (anything else is refused)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _refuse(param, "expected a string or a list of text blocks")
    parts = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _refuse(f"{param}[{index}]", "only text blocks can be translated here")
        parts.append(str(block.get("text", "")))
    return "\n\n".join(parts) if len(parts) > 1 else (parts[0] if parts else "")


# -- requests: Anthropic -> OpenAI ------------------------------------------------------------

_ANTHROPIC_PARAMS: Final = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stream",
        "stop_sequences",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "metadata",
    }
)


def request_to_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat completion request for ``model``."""
    for key, value in body.items():
        if key == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
            continue
        if key not in _ANTHROPIC_PARAMS and value is not None:
            raise _refuse(key, "an OpenAI-compatible upstream has no such parameter")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise _refuse("messages", "expected a list of messages")
    for index, message in enumerate(raw_messages):
        messages.extend(_message_to_openai(message, f"messages[{index}]"))
    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stops = body.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or len(stops) > 4:
            raise _refuse("stop_sequences", "OpenAI takes at most 4 stop sequences")
        out["stop"] = stops
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool_to_openai(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice_to_openai(choice, out)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id") is not None:
        out["user"] = str(metadata["user_id"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _message_to_openai(message: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _refuse(param, "expected a message object")
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise _refuse(f"{param}.role", "expected `user` or `assistant`")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _refuse(f"{param}.content", "expected a string or a list of blocks")
    if role == "assistant":
        return [_assistant_to_openai(content, f"{param}.content")]
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        where = f"{param}.content[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif kind == "tool_result":
            text = _text_of(block.get("content") or "", f"{where}.content")
            if block.get("is_error"):
                text = f"[tool error] {text}"
            tool_messages.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
        else:
            raise _refuse(where, f"a `{kind}` block has no OpenAI equivalent")
    # OpenAI wants tool answers right after the assistant's calls, before any new user text.
    if parts:
        tool_messages.append({"role": "user", "content": parts})
    return tool_messages


def _assistant_to_openai(content: list[Any], param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        where = f"{param}[{index}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = _encode(block.get("input") or {}).decode()
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        else:
            raise _refuse(where, f"a `{kind}` block has no OpenAI equivalent")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _image_url(block: dict[str, Any], param: str) -> str:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64":
            return f"data:{source.get('media_type')};base64,{source.get('data')}"
        if source.get("type") == "url":
            return str(source.get("url"))
    raise _refuse(f"{param}.source", "only base64 and URL images can be translated")


def _tool_to_openai(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _refuse(param, f"the server tool `{kind}` runs only on Anthropic's side")
    function: dict[str, Any] = {"name": tool.get("name")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _tool_choice_to_openai(choice: Any, out: dict[str, Any]) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        raise _refuse("tool_choice", f"unknown tool choice `{kind}`")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


# -- requests: OpenAI -> Anthropic ------------------------------------------------------------

_OPENAI_PARAMS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "stop",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "n",
    }
)


#: Message fields the translation carries over; any other (``name``, ``audio``, a
#: ``reasoning_content`` echoed back) must be empty.
_OPENAI_MESSAGE_FIELDS: Final = frozenset({"role", "content", "tool_calls", "tool_call_id"})


def request_from_openai(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat completion request as an Anthropic Messages request for ``model``."""
    for key, value in body.items():
        if key not in _OPENAI_PARAMS and value is not None:
            raise _refuse(key, "the Anthropic Messages API has no such parameter")
    if body.get("n") not in (None, 1):
        raise _refuse("n", "Anthropic answers with one choice")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise _refuse("messages", "expected a list of messages")
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(raw_messages):
        param = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        for key, value in message.items() if isinstance(message, dict) else ():
            # Echoed SDK objects carry empty extras (refusal, audio, annotations): fine.
            if key not in _OPENAI_MESSAGE_FIELDS and value:
                raise _refuse(f"{param}.{key}", "Anthropic messages have no such field")
        if role in ("system", "developer"):
            if messages:
                raise _refuse(param, "Anthropic takes system instructions only before the chat")
            system.append({"type": "text", "text": _parts_text(message.get("content"), param)})
        elif role == "user":
            messages.append({"role": "user", "content": _user_from_openai(message, param)})
        elif role == "assistant":
            messages.append(
                {"role": "assistant", "content": _assistant_from_openai(message, param)}
            )
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _parts_text(message.get("content"), f"{param}.content"),
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "user" and _all_results(last["content"]):
                last["content"].append(result)
            else:
                messages.append({"role": "user", "content": [result]})
        else:
            raise _refuse(f"{param}.role", f"the role `{role}` has no Anthropic equivalent")
    cap = body.get("max_completion_tokens")
    if cap is None:
        cap = body.get("max_tokens")
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": cap if cap is not None else DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = system
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            raise _refuse("temperature", "Anthropic takes a temperature between 0 and 1")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool_from_openai(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = _tool_choice_from_openai(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice
    if body.get("user") is not None:
        out["metadata"] = {"user_id": str(body["user"])}
    if body.get("stream"):
        out["stream"] = True
    return out


def _all_results(content: Any) -> bool:
    return isinstance(content, list) and all(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _parts_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    return _text_of(content, param)


def _user_from_openai(message: dict[str, Any], param: str) -> Any:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{param}.content", "expected a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _image_source(url, where)})
        else:
            raise _refuse(where, f"a `{kind}` part has no Anthropic equivalent")
    return blocks


def _image_source(url: Any, param: str) -> dict[str, Any]:
    if not isinstance(url, str):
        raise _refuse(param, "expected an image URL")
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64":
            raise _refuse(param, "only base64 data URLs can be translated")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _assistant_from_openai(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if content:
        blocks.append({"type": "text", "text": _text_of(content, f"{param}.content")})
    for index, call in enumerate(message.get("tool_calls") or ()):
        where = f"{param}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _refuse(where, "expected a function call")
        try:
            arguments = _decode(function.get("arguments") or "{}")
        except msgspec.DecodeError:
            raise _refuse(f"{where}.function.arguments", "the arguments are not JSON") from None
        if not isinstance(arguments, dict):
            raise _refuse(f"{where}.function.arguments", "Anthropic takes an object as input")
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": arguments,
            }
        )
    return blocks


def _tool_from_openai(tool: Any, param: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise _refuse(param, "only function tools can be translated")
    if function.get("strict"):
        raise _refuse(f"{param}.function.strict", "Anthropic has no strict schema mode")
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description") is not None:
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice_from_openai(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name")}
    raise _refuse("tool_choice", "unknown tool choice")


# -- usage ------------------------------------------------------------------------------------


def checked_anthropic_usage(
    raw: object, bounds: UsageBounds, estimate_output: Callable[[], int] | None = None
) -> Usage:
    """Anthropic's ``usage`` object as a ``Usage`` inside ``bounds`` (checked by the same rule
    as OpenAI's, ``metering.usage.checked_usage``); never raises."""
    if not isinstance(raw, dict):
        return checked_usage(raw, bounds, estimate_output)
    fresh = raw.get("input_tokens")
    read = raw.get("cache_read_input_tokens") or 0
    write = raw.get("cache_creation_input_tokens") or 0
    parts = (fresh, read, write)
    if all(type(part) is int and part >= 0 for part in parts):
        prompt: object = fresh + read + write  # type: ignore[operator]
    else:
        prompt = next(part for part in parts if not (type(part) is int and part >= 0))
    usage = checked_usage(
        {
            "prompt_tokens": prompt,
            "completion_tokens": raw.get("output_tokens"),
            "prompt_tokens_details": {"cached_tokens": read},
        },
        bounds,
        estimate_output,
    )
    if type(write) is not int or write <= 0:
        return usage
    room = usage.input_tokens - usage.cached_tokens
    anomalies = usage.anomalies
    if write > room:
        write = room
        anomalies = (*anomalies, "inconsistent") if "inconsistent" not in anomalies else anomalies
    return msgspec.structs.replace(usage, cache_write_tokens=write, anomalies=anomalies)


def parse_json_usage(body: bytes, bounds: UsageBounds | None = None) -> Usage | None:
    """The checked usage of an Anthropic JSON message; ``None`` when it reports none."""
    data = json_object(body)
    if data is None or "usage" not in data:
        return None

    def output() -> int:
        return estimate_text_tokens(_content_chars(data.get("content")))

    return checked_anthropic_usage(data["usage"], bounds or USAGE_BOUNDS.get(), output)


def _content_chars(content: Any) -> int:
    chars = 0
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            for key in ("text", "thinking"):
                value = block.get(key)
                if isinstance(value, str):
                    chars += len(value)
            if block.get("type") == "tool_use":
                chars += len(_encode(block.get("input")))
    return chars


def usage_json_openai(usage: Usage) -> dict[str, Any]:
    """A usage record in OpenAI's shape."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def usage_json_anthropic(usage: Usage) -> dict[str, Any]:
    """A usage record in Anthropic's shape (``input_tokens`` without the cached part)."""
    return {
        "input_tokens": usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.output_tokens,
    }


# -- JSON answers -----------------------------------------------------------------------------


def response_to_openai(data: dict[str, Any], usage: Usage | None) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat completion."""
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            function = {
                "name": block.get("name"),
                "arguments": _encode(block.get("input")).decode(),
            }
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": f"chatcmpl-{data.get('id', '')}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": STOP_TO_FINISH.get(str(data.get("stop_reason")), "stop"),
            }
        ],
    }
    if usage is not None:
        out["usage"] = usage_json_openai(usage)
    return out


def response_from_openai(
    data: dict[str, Any], usage: Usage | None, message_id: str
) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic message."""
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments")),
            }
        )
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": data.get("model"),
        "content": content,
        "stop_reason": FINISH_TO_STOP.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": usage_json_anthropic(usage or Usage()),
    }


def _arguments(raw: Any) -> Any:
    """Tool arguments as Anthropic's ``input`` object (what is not JSON stays a string under
    ``_raw``: the client sees it, nothing is lost)."""
    try:
        value = _decode(raw or "{}")
    except (msgspec.DecodeError, TypeError):
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_raw": raw}


# -- errors -----------------------------------------------------------------------------------


def error_to_anthropic(status: int, body: bytes, request_id: str | None = None) -> bytes:
    """An OpenAI-shaped error body in Anthropic's shape; other bodies unchanged."""
    data = json_object(body)
    if data is None or not isinstance(data.get("error"), dict) or data.get("type") == "error":
        return body
    error = data["error"]
    return anthropic_error_body(status, str(error.get("message", "")), request_id)


def error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic-shaped error body in OpenAI's shape; other bodies unchanged."""
    data = json_object(body)
    if data is None or not isinstance(data.get("error"), dict) or data.get("type") != "error":
        return body
    error = data["error"]
    kind = str(error.get("type") or anthropic_error_type(status))
    detail = {"message": str(error.get("message", "")), "type": kind, "param": None, "code": kind}
    return _encode({"error": detail})


# -- streams ----------------------------------------------------------------------------------


class _AnthropicUsage:
    """Anthropic's stream usage: ``message_start`` gives the input, ``message_delta`` the
    output so far (and may restate the input)."""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {}

    def merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.raw.update({k: v for k, v in usage.items() if v is not None})


class AnthropicStreamTap(TranslatingStream):
    """A native Anthropic stream relayed as it came, whole events at a time; its usage and
    text are recorded on the way."""

    def __init__(self) -> None:
        super().__init__()
        self._usage = _AnthropicUsage()

    def _on_event(self, event: bytes) -> bytes:
        _name, data = parse_event(event)
        payload = json_object(data)
        if payload is not None:
            kind = payload.get("type")
            if kind == "content_block_delta":
                delta = payload.get("delta") or {}
                for key in ("text", "thinking", "partial_json"):
                    value = delta.get(key)
                    if isinstance(value, str):
                        self.content_chars += len(value)
            elif kind == "message_start":
                message = payload.get("message") or {}
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                self._usage.merge(message.get("usage"))
            elif kind == "message_delta":
                self._usage.merge(payload.get("usage"))
                self.usage = checked_anthropic_usage(
                    self._usage.raw, self.bounds, self.estimated_output_tokens
                )
        return event + b"\n\n"


class ToAnthropicStream(FromChatStream):
    """An OpenAI chat completion stream written as Anthropic's event sequence."""

    def __init__(self, message_id: str, model: str) -> None:
        super().__init__()
        self.message_id = message_id
        self.model_name = model
        self._block = -1
        self._block_kind: str | None = None
        #: OpenAI tool call index -> Anthropic content block index.
        self._tools: dict[int, int] = {}

    def _on_error(self, error: dict[str, Any]) -> bytes:
        body = anthropic_error_body(500, str(error.get("message", "upstream error")))
        return sse_event("error", body)

    def _on_delta(self, delta: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if delta.get("reasoning_content"):
            self.content_chars += len(delta["reasoning_content"])
        text = delta.get("content")
        if text:
            self.content_chars += len(text)
            if self._block_kind != "text":
                out.append(self._open("text", {"type": "text", "text": ""}))
            delta_event = {"type": "text_delta", "text": text}
            out.append(self._delta(delta_event))
        for call in delta.get("tool_calls") or ():
            out.append(self._tool_call(call))
        return out

    def _start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model or self.model_name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        start = sse_event("message_start", _encode({"type": "message_start", "message": message}))
        return start + sse_event("ping", b'{"type":"ping"}')

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._block += 1
        self._block_kind = kind
        body = {"type": "content_block_start", "index": self._block, "content_block": block}
        return out + sse_event("content_block_start", _encode(body))

    def _close(self) -> bytes:
        if self._block_kind is None:
            return b""
        self._block_kind = None
        body = {"type": "content_block_stop", "index": self._block}
        return sse_event("content_block_stop", _encode(body))

    def _delta(self, delta: dict[str, Any]) -> bytes:
        body = {"type": "content_block_delta", "index": self._block, "delta": delta}
        return sse_event("content_block_delta", _encode(body))

    def _tool_call(self, call: Any) -> bytes:
        if not isinstance(call, dict):
            return b""
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        if index not in self._tools:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": {},
            }
            out += self._open("tool_use", block)
            self._tools[index] = self._block
        arguments = function.get("arguments")
        if arguments:
            self.content_chars += len(arguments)
            if self._tools[index] == self._block:
                out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        return out

    def _end(self) -> bytes:
        if self._ended or not self._started:
            return b""
        self._ended = True
        usage = self.usage or Usage()
        body = {
            "type": "message_delta",
            "delta": {
                "stop_reason": FINISH_TO_STOP.get(str(self._finish_reason), "end_turn"),
                "stop_sequence": None,
            },
            "usage": usage_json_anthropic(usage),
        }
        return (
            self._close()
            + sse_event("message_delta", _encode(body))
            + sse_event("message_stop", b'{"type":"message_stop"}')
        )


class ToOpenAIStream(TranslatingStream):
    """An Anthropic event sequence written as an OpenAI chat completion stream (with the
    usage chunk when the client asked for it)."""

    def __init__(self, *, include_usage: bool) -> None:
        super().__init__()
        self.include_usage = include_usage
        self._usage = _AnthropicUsage()
        self._id = "chatcmpl-"
        self._created = int(time.time())
        #: Anthropic content block index -> OpenAI tool call index.
        self._tools: dict[int, int] = {}
        self._done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return sse_event(None, _encode(body))

    def _on_event(self, event: bytes) -> bytes:
        _name, data = parse_event(event)
        payload = json_object(data)
        if payload is None or self._done:
            return b""
        kind = payload.get("type")
        if kind == "content_block_delta":
            delta = payload.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = str(delta.get("text", ""))
                self.content_chars += len(text)
                return self._chunk({"content": text})
            if dtype == "thinking_delta":
                text = str(delta.get("thinking", ""))
                self.content_chars += len(text)
                return self._chunk({"reasoning_content": text})
            if dtype == "input_json_delta":
                partial = str(delta.get("partial_json", ""))
                self.content_chars += len(partial)
                index = self._tools.get(payload.get("index", -1))
                if index is None:
                    return b""
                call = {"index": index, "function": {"arguments": partial}}
                return self._chunk({"tool_calls": [call]})
            return b""
        if kind == "content_block_start":
            block = payload.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[payload.get("index", -1)] = len(self._tools)
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                self.content_chars += len(block["text"])
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "message_start":
            message = payload.get("message") or {}
            self._id = f"chatcmpl-{message.get('id', '')}"
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            self._usage.merge(message.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            self._usage.merge(payload.get("usage"))
            self.usage = checked_anthropic_usage(
                self._usage.raw, self.bounds, self.estimated_output_tokens
            )
            stop = (payload.get("delta") or {}).get("stop_reason")
            return self._chunk({}, STOP_TO_FINISH.get(str(stop), "stop"))
        if kind == "message_stop":
            return self._end()
        if kind == "error":
            self._done = True
            error = payload.get("error") or {}
            kind = str(error.get("type") or "api_error")
            detail = {"message": error.get("message"), "type": kind, "param": None, "code": kind}
            return sse_event(None, _encode({"error": detail}))
        return b""  # ping and events to come

    def _end(self) -> bytes:
        self._done = True
        out = b""
        if self.include_usage and self.usage is not None:
            body = {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self.model,
                "choices": [],
                "usage": usage_json_openai(self.usage),
            }
            out = sse_event(None, _encode(body))
        return out + b"data: [DONE]\n\n"
