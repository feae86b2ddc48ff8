"""The upstream adapter: what changes when a request's format or its upstream's is not OpenAI's.

The proxy's OpenAI-to-OpenAI path needs none (it keeps its own, faster code). Every other
pair gets one ``Adapter``: the upstream's path, the body it is sent, the usage read from its
JSON answer, that answer (or error) in the client's format, and the tap that relays (and
translates) its stream. Translation happens only when the two formats differ.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from tenantware.context import Outcome, RequestContext, Usage, WireFormat
from tenantware.errors import GatewayError
from tenantware.formats import anthropic, responses
from tenantware.formats.sse import json_object
from tenantware.metering.usage import parse_json_usage

__all__ = ["Adapter", "StreamTranslator", "adapter_for"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class StreamTranslator(Protocol):
    """What the proxy's stream relay asks of a tap (``metering.usage.StreamTap`` is one)."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def model(self) -> str | None: ...

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def estimated_output_tokens(self) -> int: ...


def decode_body(body: bytes) -> dict[str, Any]:
    """The whole request body (the tenant layer decoded only the fields it acts on)."""
    try:
        data = _decode(body)
    except (msgspec.DecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request.",
            outcome=Outcome.REJECTED_REQUEST,
        )
    return data


class Adapter:
    """The OpenAI-to-OpenAI behaviour, spelled out for the other pairs to override."""

    #: The upstream's path (under its ``base_url``).
    upstream_path = "/chat/completions"
    #: The upstream keeps what it answers (``GET /v1/responses/{id}`` reads it there).
    stores_answers = False

    def body(self, ctx: RequestContext, upstream_model: str) -> bytes:
        data = decode_body(ctx.body)
        data["model"] = upstream_model
        return _encode(data)

    def usage(self, data: bytes) -> Usage | None:
        return parse_json_usage(data)[0]

    def answer(self, ctx: RequestContext, status: int, data: bytes, usage: Usage | None) -> bytes:
        return data

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        raise NotImplementedError

    def answer_id(self, data: bytes) -> str | None:
        """The id under which the upstream stored this JSON answer (``stores_answers``)."""
        return None

    def stream_id(self, tap: StreamTranslator) -> str | None:
        """The id under which the upstream stored this streamed answer."""
        return None


class _AnthropicNative(Adapter):
    """Anthropic client, Anthropic upstream: relayed as it came, usage read on the way."""

    upstream_path = "/messages"

    def usage(self, data: bytes) -> Usage | None:
        return anthropic.parse_json_usage(data)

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return anthropic.AnthropicStreamTap()


class _AnthropicToOpenAI(Adapter):
    """Anthropic client, OpenAI-compatible upstream."""

    def body(self, ctx: RequestContext, upstream_model: str) -> bytes:
        return _encode(anthropic.request_to_openai(decode_body(ctx.body), upstream_model))

    def answer(self, ctx: RequestContext, status: int, data: bytes, usage: Usage | None) -> bytes:
        if status >= 400:
            return anthropic.error_to_anthropic(status, data, ctx.request_id)
        parsed = json_object(data)
        if parsed is None or "choices" not in parsed:
            return data
        return _encode(anthropic.response_from_openai(parsed, usage, _message_id(ctx)))

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return anthropic.ToAnthropicStream(_message_id(ctx), ctx.model or "")


class _OpenAIToAnthropic(Adapter):
    """OpenAI chat completions client, Anthropic upstream."""

    upstream_path = "/messages"

    def body(self, ctx: RequestContext, upstream_model: str) -> bytes:
        return _encode(anthropic.request_from_openai(decode_body(ctx.body), upstream_model))

    def usage(self, data: bytes) -> Usage | None:
        return anthropic.parse_json_usage(data)

    def answer(self, ctx: RequestContext, status: int, data: bytes, usage: Usage | None) -> bytes:
        if status >= 400:
            return anthropic.error_to_openai(status, data)
        parsed = json_object(data)
        if parsed is None or parsed.get("type") != "message":
            return data
        return _encode(anthropic.response_to_openai(parsed, usage))

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return anthropic.ToOpenAIStream(include_usage=include_usage)


class _ResponsesToChat(Adapter):
    """Responses API client, chat completions upstream."""

    def body(self, ctx: RequestContext, upstream_model: str) -> bytes:
        return _encode(responses.request_to_chat(decode_body(ctx.body), upstream_model))

    def answer(self, ctx: RequestContext, status: int, data: bytes, usage: Usage | None) -> bytes:
        if status >= 400:
            return data  # OpenAI's error shape is the Responses API's too
        parsed = json_object(data)
        if parsed is None or "choices" not in parsed:
            return data
        return _encode(responses.response_from_chat(parsed, usage, _response_id(ctx)))

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return responses.ToResponsesStream(_response_id(ctx), ctx.model or "")


class _ResponsesToAnthropic(Adapter):
    """Responses API client, Anthropic upstream: through chat completions both ways (the two
    translations composed, so each stays one tested function)."""

    upstream_path = "/messages"

    def body(self, ctx: RequestContext, upstream_model: str) -> bytes:
        chat = responses.request_to_chat(decode_body(ctx.body), upstream_model)
        chat.pop("stream_options", None)
        return _encode(anthropic.request_from_openai(chat, upstream_model))

    def usage(self, data: bytes) -> Usage | None:
        return anthropic.parse_json_usage(data)

    def answer(self, ctx: RequestContext, status: int, data: bytes, usage: Usage | None) -> bytes:
        if status >= 400:
            return anthropic.error_to_openai(status, data)
        parsed = json_object(data)
        if parsed is None or parsed.get("type") != "message":
            return data
        chat = anthropic.response_to_openai(parsed, usage)
        return _encode(responses.response_from_chat(chat, usage, _response_id(ctx)))

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return _Chained(
            anthropic.ToOpenAIStream(include_usage=True),
            responses.ToResponsesStream(_response_id(ctx), ctx.model or ""),
        )


class _Chained:
    """Two stream translations in a row; the usage and model are the upstream side's."""

    def __init__(self, first: StreamTranslator, second: StreamTranslator) -> None:
        self.first = first
        self.second = second

    @property
    def usage(self) -> Usage | None:
        return self.first.usage

    @property
    def model(self) -> str | None:
        return self.first.model

    def feed(self, chunk: bytes) -> bytes:
        middle = self.first.feed(chunk)
        return self.second.feed(middle) if middle else b""

    def flush(self) -> bytes:
        return self.second.feed(self.first.flush()) + self.second.flush()

    def estimated_output_tokens(self) -> int:
        return self.first.estimated_output_tokens()


class _ResponsesNative(Adapter):
    """Responses API client, an upstream that serves it: relayed, usage read on the way."""

    upstream_path = "/responses"
    stores_answers = True

    def usage(self, data: bytes) -> Usage | None:
        return responses.parse_json_usage(data)

    def tap(self, ctx: RequestContext, *, include_usage: bool) -> StreamTranslator:
        return responses.ResponsesStreamTap()

    def answer_id(self, data: bytes) -> str | None:
        return responses.response_id_of(data)

    def stream_id(self, tap: StreamTranslator) -> str | None:
        return tap.response_id if isinstance(tap, responses.ResponsesStreamTap) else None


def _response_id(ctx: RequestContext) -> str:
    return f"resp_{ctx.request_id.removeprefix('req_')}"


def _message_id(ctx: RequestContext) -> str:
    return f"msg_{ctx.request_id.removeprefix('req_')}"


_NATIVE = _AnthropicNative()
_TO_OPENAI = _AnthropicToOpenAI()
_TO_ANTHROPIC = _OpenAIToAnthropic()
_RESPONSES_TO_CHAT = _ResponsesToChat()
_RESPONSES_TO_ANTHROPIC = _ResponsesToAnthropic()
_RESPONSES_NATIVE = _ResponsesNative()


def adapter_for(
    client: WireFormat, upstream: str, path: str, *, native_responses: bool = False
) -> Adapter:
    """The adapter between a client speaking ``client`` on ``path`` and an upstream speaking
    ``upstream`` (``native_responses``: it serves the Responses API too); a 400 when the route
    has no equivalent there."""
    if client == "anthropic":
        return _NATIVE if upstream == "anthropic" else _TO_OPENAI
    if client == "responses":
        if upstream != "openai":
            return _RESPONSES_TO_ANTHROPIC
        return _RESPONSES_NATIVE if native_responses else _RESPONSES_TO_CHAT
    if path != "/chat/completions":
        raise GatewayError(
            400,
            f"`{path.lstrip('/')}` is not available for this model: its upstream speaks the "
            "Anthropic Messages API, which has no equivalent.",
            code="unsupported_for_model",
            outcome=Outcome.REJECTED_REQUEST,
        )
    return _TO_ANTHROPIC
