"""``/v1/openapi.json``: the OpenAPI 3.1 document of the proxy routes.

It describes what the gateway itself checks and answers: the request bodies (the fields the
gateway reads; every other field is forwarded to the upstream untouched, so objects stay
open), the answers of an OpenAI-compatible upstream as the gateway relays them, and every
error the gateway sends, in OpenAI's shape, or Anthropic's on ``/v1/messages``. It holds no
configuration (no model, tenant or key), so ``tenantware serve`` answers it without a key.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec

__all__ = ["OPENAPI_PATH", "openapi_document"]

#: Where the gateway serves the document (no key needed).
OPENAPI_PATH: Final = "/v1/openapi.json"

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _object(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TOKENS = {"type": "integer", "minimum": 1}
_TOKEN_COUNT = {"type": "integer", "minimum": 0}
#: A content part or block: ``{"type": "text", "text": ...}``, an image, a tool call...
_PART = _object(["type"], {"type": _STRING, "text": _STRING})
_TEXT_OR_PARTS = {"anyOf": [_STRING, {"type": "array", "items": _PART}]}

_SCHEMAS: Final[dict[str, Any]] = {
    "OpenAIError": _object(
        ["error"],
        {
            "error": _object(
                ["message", "type"],
                {
                    "message": _STRING,
                    "type": _STRING,
                    "param": _NULLABLE_STRING,
                    "code": {"type": ["string", "integer", "null"]},
                },
            )
        },
    ),
    "AnthropicError": _object(
        ["type", "error"],
        {
            "type": {"const": "error"},
            "error": _object(["type", "message"], {"type": _STRING, "message": _STRING}),
            "request_id": _STRING,
        },
    ),
    "ChatMessage": _object(
        ["role"],
        {
            "role": _STRING,
            "content": {"anyOf": [_TEXT_OR_PARTS, {"type": "null"}]},
            "name": _STRING,
        },
    ),
    "StreamOptions": _object([], {"include_usage": {"type": "boolean"}}),
    "ChatCompletionRequest": _object(
        ["model", "messages"],
        {
            "model": _STRING,
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "stream": {"type": "boolean"},
            "stream_options": _ref("StreamOptions"),
            "max_tokens": _TOKENS,
            "max_completion_tokens": _TOKENS,
            "n": {"type": "integer", "minimum": 1, "maximum": 128},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "user": _STRING,
        },
    ),
    "CompletionRequest": _object(
        ["model", "prompt"],
        {
            "model": _STRING,
            "prompt": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": _STRING},
                ]
            },
            "stream": {"type": "boolean"},
            "stream_options": _ref("StreamOptions"),
            "max_tokens": _TOKENS,
            "n": {"type": "integer", "minimum": 1, "maximum": 128},
        },
    ),
    "EmbeddingRequest": _object(
        ["model", "input"],
        {
            "model": _STRING,
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": _STRING},
                ]
            },
            "dimensions": {"type": "integer", "minimum": 1, "maximum": 4096},
            "encoding_format": {"enum": ["float", "base64"]},
        },
    ),
    "AnthropicMessage": _object(
        ["role", "content"],
        {"role": {"enum": ["user", "assistant"]}, "content": _TEXT_OR_PARTS},
    ),
    "MessagesRequest": _object(
        ["model", "max_tokens", "messages"],
        {
            "model": _STRING,
            "max_tokens": _TOKENS,
            "messages": {"type": "array", "minItems": 1, "items": _ref("AnthropicMessage")},
            "system": _TEXT_OR_PARTS,
            "stream": {"type": "boolean"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        },
    ),
    "CountTokensRequest": _object(
        ["model", "messages"],
        {
            "model": _STRING,
            "messages": {"type": "array", "items": _ref("AnthropicMessage")},
            "system": _TEXT_OR_PARTS,
        },
    ),
    "ResponsesRequest": _object(
        ["model", "input"],
        {
            "model": _STRING,
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "object"}},
                ]
            },
            "instructions": _STRING,
            "stream": {"type": "boolean"},
            "max_output_tokens": _TOKENS,
        },
    ),
    "ChatCompletion": _object(
        ["id", "object", "choices"],
        {
            "id": _STRING,
            "object": {"const": "chat.completion"},
            "model": _STRING,
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": "object"},
        },
    ),
    "Completion": _object(
        ["id", "object", "choices"],
        {
            "id": _STRING,
            "object": {"const": "text_completion"},
            "model": _STRING,
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": "object"},
        },
    ),
    "EmbeddingList": _object(
        ["object", "data"],
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": _STRING,
            "usage": {"type": "object"},
        },
    ),
    "ModelList": _object(
        ["object", "data"],
        {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": _object(["id", "object"], {"id": _STRING, "object": {"const": "model"}}),
            },
        },
    ),
    "Message": _object(
        ["id", "type", "role", "content"],
        {
            "id": _STRING,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "content": {"type": "array", "items": {"type": "object"}},
            "model": _STRING,
            "usage": {"type": "object"},
        },
    ),
    "ResponseDeleted": _object(
        ["id", "object", "deleted"],
        {"id": _STRING, "object": {"const": "response.deleted"}, "deleted": {"type": "boolean"}},
    ),
    "InputItemList": _object(
        ["object", "data"],
        {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}},
    ),
    "TokenCount": _object(["input_tokens"], {"input_tokens": _TOKEN_COUNT}),
    "Response": _object(
        ["id", "object", "output"],
        {
            "id": _STRING,
            "object": {"const": "response"},
            "model": _STRING,
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": "object"},
        },
    ),
}

#: One server-sent event: ``data`` is a JSON chunk (or ``[DONE]``), ``event`` Anthropic's
#: event names (``message_start``...), ``message`` when unnamed.
_EVENT = _object(["data"], {"event": _STRING, "data": _STRING, "id": _STRING})
_EVENT_STREAM = {"text/event-stream": {"schema": _EVENT}}


_RESPONSE_ID = {
    "name": "response_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,256}$"},
}


def _errors(shape: str) -> dict[str, Any]:
    """Every refusal, in ``shape``: 400 bad body, 401 key, 403 model not allowed, 404 unknown
    model, 413 body too large, 429 quota, 502/503/504 upstream, circuit, queue."""
    answer = {
        "description": f"Refused or failed ({shape.removesuffix('Error')} error shape)",
        "content": {"application/json": {"schema": _ref(shape)}},
    }
    statuses = ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504")
    return {**dict.fromkeys(statuses, answer), "default": answer}


def _post(
    summary: str, body: str, answer: str, *, stream: bool = True, shape: str = "OpenAIError"
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(answer)}}
    if stream:
        content.update(_EVENT_STREAM)  # "stream": true
    operation: dict[str, Any] = {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        },
        "responses": {"200": {"description": "The upstream's answer", "content": content}},
    }
    operation["responses"].update(_errors(shape))
    return operation


@functools.cache
def openapi_document() -> bytes:
    """The document, built once per process."""
    messages = _post(
        "Anthropic Messages API (relayed to Anthropic upstreams, translated for others)",
        "MessagesRequest",
        "Message",
        shape="AnthropicError",
    )
    count_tokens = _post(
        "Count a Messages request's input tokens (the gateway's estimate)",
        "CountTokensRequest",
        "TokenCount",
        stream=False,
        shape="AnthropicError",
    )
    models: dict[str, Any] = {
        "summary": "The models this key may use",
        "responses": {
            "200": {
                "description": "The models, by name",
                "content": {"application/json": {"schema": _ref("ModelList")}},
            },
            **_errors("OpenAIError"),
        },
    }

    def stored(summary: str, answer: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "parameters": [_RESPONSE_ID],
            "responses": {
                "200": {
                    "description": "The upstream's answer",
                    "content": {"application/json": {"schema": _ref(answer)}},
                },
                **_errors("OpenAIError"),
            },
        }

    document = {
        "openapi": "3.1.0",
        "info": {"title": "tenantware proxy API", "version": "1"},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"x-api-key": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": _post("Chat completion", "ChatCompletionRequest", "ChatCompletion")
            },
            "/v1/completions": {
                "post": _post("Text completion (legacy)", "CompletionRequest", "Completion")
            },
            "/v1/embeddings": {
                "post": _post("Embeddings", "EmbeddingRequest", "EmbeddingList", stream=False)
            },
            "/v1/models": {"get": models},
            "/v1/messages": {"post": messages},
            "/v1/messages/count_tokens": {"post": count_tokens},
            "/v1/responses": {
                "post": _post(
                    "OpenAI Responses API (translated to chat completions upstream)",
                    "ResponsesRequest",
                    "Response",
                )
            },
            # Stored responses: only for the tenant whose request created them (others: 404).
            "/v1/responses/{response_id}": {
                "get": stored("Read a stored response", "Response"),
                "delete": stored("Delete a stored response", "ResponseDeleted"),
            },
            "/v1/responses/{response_id}/input_items": {
                "get": stored("The input items of a stored response", "InputItemList"),
            },
        },
    }
    return msgspec.json.encode(document)
