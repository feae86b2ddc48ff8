"""OpenAI's Responses API translated to and from chat completions.

A ``/v1/responses`` request for an upstream that speaks only chat completions becomes a chat
request; its answer (JSON, or the chunk stream) becomes a Response object (or the Responses
event sequence). What has no chat equivalent (server-side state such as
``previous_response_id`` and ``store``, hosted tools, ``include``, reasoning summaries) is
refused with a 400 naming the parameter, never dropped.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

from tenantware.context import Outcome, Usage
from tenantware.errors import GatewayError
from tenantware.formats.sse import (
    FromChatStream,
    TranslatingStream,
    json_object,
    parse_event,
    sse_event,
)
from tenantware.metering.usage import USAGE_BOUNDS, UsageBounds, checked_usage

__all__ = [
    "ResponsesStreamTap",
    "ToResponsesStream",
    "parse_json_usage",
    "request_to_chat",
    "response_from_chat",
    "response_id_of",
    "usage_json_responses",
]

_encode = msgspec.json.Encoder().encode

_PARAMS: Final = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "stream",
        "user",
        "service_tier",
        "truncation",
        "store",
    }
)


def _refuse(param: str, why: str) -> GatewayError:
    return GatewayError(
        400,
        f"`{param}` cannot be translated for this model's upstream (chat completions only): {why}.",
        param=param,
        code="untranslatable_parameter",
        outcome=Outcome.REJECTED_REQUEST,
    )


def request_to_chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A Responses API request as a chat completion request for ``model``."""
    for key, value in body.items():
        if key not in _PARAMS and value not in (None, [], {}):
            raise _refuse(key, "chat completions have no such parameter")
    if body.get("store"):
        raise _refuse("store", "the gateway keeps no responses for a chat upstream")
    if body.get("truncation") not in (None, "disabled"):
        raise _refuse("truncation", "chat completions never truncate the input")
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": str(body["instructions"])})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for index, item in enumerate(items):
            _item_to_chat(item, f"input[{index}]", messages)
    else:
        raise _refuse("input", "expected a string or a list of items")
    out: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", "user", "service_tier"):
        if body.get(name) is not None:
            out[name] = body[name]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool_to_chat(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _refuse("tool_choice", "only function tools can be chosen")
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    text = body.get("text")
    if isinstance(text, dict) and text.get("format") is not None:
        out.update(_format_to_chat(text["format"]))
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        if reasoning.get("summary") or reasoning.get("generate_summary"):
            raise _refuse("reasoning.summary", "chat completions return no reasoning summary")
        if reasoning.get("effort") is not None:
            out["reasoning_effort"] = reasoning["effort"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _item_to_chat(item: Any, param: str, messages: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise _refuse(param, "expected an input item")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise _refuse(f"{param}.role", f"unknown role `{role}`")
        messages.append({"role": role, "content": _content_to_chat(item.get("content"), param)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else _encode(output).decode(),
            }
        )
    else:
        raise _refuse(param, f"a `{kind}` item has no chat completions equivalent")


def _content_to_chat(content: Any, param: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{param}.content", "expected a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and part.get("image_url"):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _refuse(where, f"a `{kind}` part has no chat completions equivalent")
    if parts and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts) if len(parts) == 1 else parts
    return parts


def _tool_to_chat(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _refuse(param, f"the hosted tool `{kind}` runs only on OpenAI's side")
    function: dict[str, Any] = {"name": tool.get("name")}
    for key in ("description", "parameters", "strict"):
        if tool.get(key) is not None:
            function[key] = tool[key]
    return {"type": "function", "function": function}


def _format_to_chat(format_: Any) -> dict[str, Any]:
    kind = format_.get("type") if isinstance(format_, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = {
            k: format_[k] for k in ("name", "schema", "strict", "description") if k in format_
        }
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise _refuse("text.format", f"unknown format `{kind}`")


# -- usage ------------------------------------------------------------------------------------


def checked_responses_usage(raw: object, bounds: UsageBounds) -> Usage:
    """The Responses API's ``usage`` object checked by the chat completions rule."""
    if not isinstance(raw, dict):
        return checked_usage(raw, bounds)
    return checked_usage(
        {
            "prompt_tokens": raw.get("input_tokens"),
            "completion_tokens": raw.get("output_tokens"),
            "prompt_tokens_details": raw.get("input_tokens_details"),
            "completion_tokens_details": raw.get("output_tokens_details"),
        },
        bounds,
    )


def parse_json_usage(body: bytes, bounds: UsageBounds | None = None) -> Usage | None:
    """The checked usage of a Response object; ``None`` when it reports none."""
    data = json_object(body)
    if data is None or data.get("usage") is None:
        return None
    return checked_responses_usage(data["usage"], bounds or USAGE_BOUNDS.get())


class _Identified(msgspec.Struct):
    id: Any = None


_decode_identified = msgspec.json.Decoder(_Identified).decode


def response_id_of(body: bytes) -> str | None:
    """The ``id`` of a Response object (what ``GET /v1/responses/{id}`` names later)."""
    try:
        found = _decode_identified(body).id
    except (msgspec.DecodeError, RecursionError):
        return None
    return found if isinstance(found, str) and found else None


class ResponsesStreamTap(TranslatingStream):
    """A native Responses stream relayed as it came, whole events at a time; its usage (in
    ``response.completed``), text and response id are recorded on the way."""

    def __init__(self) -> None:
        super().__init__()
        #: The id of ``response.created`` (or a later event carrying the response).
        self.response_id: str | None = None

    def _on_event(self, event: bytes) -> bytes:
        _name, data = parse_event(event)
        payload = json_object(data)
        if payload is not None:
            kind = payload.get("type")
            if kind in ("response.output_text.delta", "response.function_call_arguments.delta"):
                delta = payload.get("delta")
                if isinstance(delta, str):
                    self.content_chars += len(delta)
            elif isinstance(payload.get("response"), dict):
                response = payload["response"]
                if self.response_id is None and isinstance(response.get("id"), str):
                    self.response_id = response["id"] or None
                if self.model is None and isinstance(response.get("model"), str):
                    self.model = response["model"]
                if response.get("usage") is not None:
                    self.usage = checked_responses_usage(response["usage"], self.bounds)
        return event + b"\n\n"


# -- answers ----------------------------------------------------------------------------------


def usage_json_responses(usage: Usage) -> dict[str, Any]:
    """A usage record in the Responses API's shape."""
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _shell(response_id: str, model: Any, created: int, status: str) -> dict[str, Any]:
    """The fields every Response object carries."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": None,
        "top_p": None,
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _call_item(item_id: str, call_id: Any, name: Any, arguments: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def response_from_chat(
    data: dict[str, Any], usage: Usage | None, response_id: str
) -> dict[str, Any]:
    """A chat completion as a Response object."""
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    incomplete = choice.get("finish_reason") == "length"
    out = _shell(
        response_id, data.get("model"), data.get("created") or int(time.time()), "completed"
    )
    if incomplete:
        out["status"] = "incomplete"
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    suffix = response_id.removeprefix("resp_")
    if message.get("content"):
        out["output"].append(_message_item(f"msg_{suffix}", str(message["content"])))
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        out["output"].append(
            _call_item(
                f"fc_{suffix}_{index}",
                call.get("id"),
                function.get("name"),
                str(function.get("arguments") or ""),
            )
        )
    out["usage"] = usage_json_responses(usage or Usage())
    return out


# -- streams ----------------------------------------------------------------------------------


class ToResponsesStream(FromChatStream):
    """A chat completion stream written as the Responses API's event sequence."""

    def __init__(self, response_id: str, model: str) -> None:
        super().__init__()
        self.response_id = response_id
        self.model_name = model
        self._suffix = response_id.removeprefix("resp_")
        self._created = int(time.time())
        self._sequence = 0
        #: Output items so far (as they will be in the final response).
        self._items: list[dict[str, Any]] = []
        #: The text of the open message item.
        self._text = ""
        #: The open message item's position in ``_items``; None while the open item (if any)
        #: is a function call, so that text after a call opens a new message item.
        self._text_at: int | None = None
        #: Chat tool call index -> position in ``_items``.
        self._calls: dict[int, int] = {}
        self._open: int | None = None

    def _event(self, name: str, body: dict[str, Any]) -> bytes:
        body = {"type": name, "sequence_number": self._sequence, **body}
        self._sequence += 1
        return sse_event(name, _encode(body))

    def _response(self, status: str) -> dict[str, Any]:
        return _shell(self.response_id, self.model or self.model_name, self._created, status)

    def _on_error(self, error: dict[str, Any]) -> bytes:
        body = {
            "code": error.get("code"),
            "message": str(error.get("message", "upstream error")),
            "param": None,
        }
        return self._event("error", body)

    def _start(self) -> bytes:
        created = self._event("response.created", {"response": self._response("in_progress")})
        progress = self._event("response.in_progress", {"response": self._response("in_progress")})
        return created + progress

    def _on_delta(self, delta: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        text = delta.get("content")
        if text:
            self.content_chars += len(text)
            out.append(self._text_delta(text))
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                out.append(self._call_delta(call))
        return out

    def _text_delta(self, text: str) -> bytes:
        out = b""
        if self._text_at is None:
            out += self._close()
            self._text = ""
            position = len(self._items)
            # The first message keeps the plain id; text after a function call is another item.
            item_id = f"msg_{self._suffix}" if position == 0 else f"msg_{self._suffix}_{position}"
            item = _message_item(item_id, "", "in_progress")
            item["content"] = []
            self._items.append(item)
            self._open = self._text_at = position
            out += self._event(
                "response.output_item.added", {"output_index": position, "item": item}
            )
            out += self._event(
                "response.content_part.added",
                {
                    "item_id": item_id,
                    "output_index": position,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                },
            )
        self._text += text
        return out + self._event(
            "response.output_text.delta",
            {
                "item_id": self._items[self._text_at]["id"],
                "output_index": self._text_at,
                "content_index": 0,
                "delta": text,
            },
        )

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        index = call.get("index", 0)
        function = call.get("function") or {}
        if index not in self._calls:
            out += self._close()
            item = _call_item(
                f"fc_{self._suffix}_{index}", call.get("id"), function.get("name"), ""
            )
            item["status"] = "in_progress"
            self._items.append(item)
            self._calls[index] = self._open = len(self._items) - 1
            out += self._event(
                "response.output_item.added", {"output_index": self._open, "item": item}
            )
        position = self._calls[index]
        arguments = function.get("arguments")
        if arguments:
            self.content_chars += len(arguments)
            self._items[position]["arguments"] += arguments
            out += self._event(
                "response.function_call_arguments.delta",
                {
                    "item_id": self._items[position]["id"],
                    "output_index": position,
                    "delta": arguments,
                },
            )
        return out

    def _close(self) -> bytes:
        """Finish the open output item (the text, or a function call)."""
        position, self._open, self._text_at = self._open, None, None
        if position is None:
            return b""
        item = self._items[position]
        item["status"] = "completed"
        out = b""
        if item["type"] == "message":
            text = self._text
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"] = [part]
            common = {"item_id": item["id"], "output_index": position, "content_index": 0}
            out += self._event("response.output_text.done", {**common, "text": text})
            out += self._event("response.content_part.done", {**common, "part": part})
        else:
            out += self._event(
                "response.function_call_arguments.done",
                {"item_id": item["id"], "output_index": position, "arguments": item["arguments"]},
            )
        return out + self._event(
            "response.output_item.done", {"output_index": position, "item": item}
        )

    def _end(self) -> bytes:
        if self._ended or not self._started:
            return b""
        self._ended = True
        out = self._close()
        response = self._response("completed")
        if self._finish_reason == "length":
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response["output"] = self._items
        response["usage"] = usage_json_responses(self.usage or Usage())
        name = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return out + self._event(name, {"response": response})
