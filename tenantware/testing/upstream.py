"""A fake OpenAI-compatible upstream for tests, benchmarks and users' own test suites.

It also speaks Anthropic's Messages API on ``POST /v1/messages`` (key in ``x-api-key``, JSON
and the Anthropic SSE event sequence, Anthropic-shaped errors, 529 for overloaded), so the
gateway's translation between the two formats is tested offline.

It is a plain ASGI app (no router, stream events pre-encoded per request, msgspec for JSON) so
that a benchmark measures the gateway and not its upstream. Every knob lives on a mutable
:class:`FakeUpstreamConfig` that a test may change between requests, and :attr:`FakeUpstream.stats`
counts exactly what was produced, so billing tests can compare the gateway's ledger with it.

Tokens are predictable on purpose: every output token is the text ``"tok "`` (one stream chunk
each) and prompt tokens come from :func:`count_prompt_tokens`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import math
import random
import secrets
import struct
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal

import anyio
import anyio.lowlevel
import msgspec

from tenantware.types import Message, Receive, Scope, Send

__all__ = [
    "DEFAULT_MODELS",
    "EMBEDDING_DIMENSIONS",
    "TOKEN_TEXT",
    "TOOL_INPUT",
    "FakeUpstream",
    "FakeUpstreamConfig",
    "InjectedStreamError",
    "RecordOutcome",
    "RecordedRequest",
    "RequestRecord",
    "UpstreamStats",
    "count_prompt_tokens",
    "main",
]

#: Models listed by ``GET /v1/models`` unless the config says otherwise.
DEFAULT_MODELS = ("gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2")
#: The text of one output token (and of one streamed content chunk).
TOKEN_TEXT = "tok "
#: Arguments of the tool call the fake makes when ``tool_use`` is set.
TOOL_INPUT = {"query": "tok"}
#: Length of the embedding vectors when the request does not ask for ``dimensions``.
EMBEDDING_DIMENSIONS = 8

#: How a request ended: ``error`` is any non-2xx answer, ``stream_failed`` is ``fail_stream_after``.
RecordOutcome = Literal["pending", "completed", "error", "client_disconnected", "stream_failed"]


class FakeUpstreamConfig(msgspec.Struct, kw_only=True):
    """How the fake upstream behaves; mutable, read afresh by every request.

    The ``Meta`` limits are checked by ``msgspec.convert``, not on assignment.
    """

    #: Seconds to wait before the response starts (every ``/v1`` route, errors included); a
    #: client that disconnects meanwhile ends the request (``client_disconnected``).
    latency_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Output tokens per completion when ``completion_tokens`` is None.
    stream_chunks: Annotated[int, msgspec.Meta(ge=0)] = 5
    #: Seconds before each streamed content chunk and before the finish chunk; when > 0 a
    #: client disconnect stops the stream at once (unpaced streams are written in one go).
    chunk_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Output tokens per completion before ``max_tokens`` caps it; None means ``stream_chunks``.
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    #: Probability that a request gets ``failure_status`` (drawn from ``FakeUpstream.rng``).
    failure_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    failure_status: int = 500
    #: Statuses the next well-formed, authorised requests answer with, first one first;
    #: a 200 in the queue lets that request through.
    fail_next: list[int] = []
    #: Sent as ``retry-after`` on injected 429s; None sends no header.
    retry_after_s: float | None = None
    #: Streams break off (no finish, usage or ``[DONE]``) after this many content chunks.
    fail_stream_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    #: When set, requests must carry ``Authorization: Bearer <require_api_key>``.
    require_api_key: str | None = None
    models: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_MODELS))
    #: Keep a :class:`RequestRecord` per ``x-request-id``; off for long benchmark runs.
    record_requests: bool = True
    #: Fields reported in completions' ``usage`` instead of the true ones (any JSON, to test
    #: that upstream numbers are untrusted), e.g. ``{"completion_tokens": 10**16}``.
    usage_override: dict[str, Any] | None = None
    #: Completions report no usage: no ``usage`` field in JSON, no usage chunk in streams.
    omit_usage: bool = False
    #: A request with ``tools`` is answered with a call of its first tool (after the text),
    #: arguments ``TOOL_INPUT``; chat completions and Anthropic messages alike.
    tool_use: bool = False
    #: With ``tool_use``, a chat completion stream sends the tool call halfway through the text
    #: (as a model that calls a tool and then goes on writing does).
    tool_call_mid_text: bool = False
    #: Prompt tokens an Anthropic answer reports as read from / written to the prompt cache,
    #: on top of ``input_tokens`` (OpenAI answers report the read part as ``cached_tokens``).
    cache_read_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    cache_creation_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0


class InjectedStreamError(RuntimeError):
    """Raised by the app to break a stream on purpose (``fail_stream_after``).

    A server then drops the connection mid-body; an in-process transport re-raises it.
    """


@dataclass(slots=True)
class RequestRecord:
    """What the fake produced for one request; token counts are what was actually sent."""

    path: str
    model: str = ""
    stream: bool = False
    #: 0 while no response has started (or if the client left before one did).
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    has_authorization: bool = False
    outcome: RecordOutcome = "pending"
    #: The W3C ``traceparent`` the request carried (the gateway's attempt span when tracing).
    traceparent: str | None = None


@dataclass(slots=True)
class UpstreamStats:
    """Totals over every request but ``/healthz``: ``requests`` on arrival, the rest on settling."""

    requests: int = 0
    #: Requests not settled yet; wait for 0 before asserting after a client disconnect.
    in_flight: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Keyed by the incoming ``x-request-id``; a record is added when its request arrives.
    by_request_id: dict[str, RequestRecord] = field(default_factory=dict)


@dataclass(slots=True)
class RecordedRequest:
    """The last request as received; the authorization value is replaced by ``[redacted]``."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens the fake bills for a request body, so tests can predict usage.

    Chat: ``ceil(characters of all message text / 4) + 3`` per message. Completions and
    embeddings: ``ceil(characters / 4)`` of the ``prompt`` / ``input`` strings, plus one per
    token id when given as token arrays.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        return _messages_tokens(messages)
    for key in ("prompt", "input"):
        if key in body:
            return _text_tokens(body[key])
    return 0


def _messages_tokens(messages: Sequence[Any]) -> int:
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, Mapping) else None
                if isinstance(text, str):
                    chars += len(text)
    return math.ceil(chars / 4) + 3 * len(messages)


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return math.ceil(len(value) / 4)
    chars = token_ids = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, int):
                token_ids += 1
            elif isinstance(item, list):
                token_ids += len(item)
    return math.ceil(chars / 4) + token_ids


# --------------------------------------------------------------------------------------------
# Request bodies: decoded straight into typed views, unknown fields ignored.


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatBody(msgspec.Struct):
    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tools: list[dict[str, Any]] | None = None


class _MessagesBody(msgspec.Struct):
    """Anthropic's Messages request: ``max_tokens`` is required there."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None


class _CompletionBody(msgspec.Struct):
    model: str
    prompt: str | list[Any] = ""
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


class _EmbeddingBody(msgspec.Struct):
    model: str
    input: str | list[Any]
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=8192)] | None = None
    encoding_format: Literal["float", "base64"] | None = None


class _ResponsesBody(msgspec.Struct):
    """OpenAI's Responses API request."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stream: bool | None = None
    tools: list[dict[str, Any]] | None = None
    store: bool | None = None


_Body = _ChatBody | _CompletionBody | _EmbeddingBody | _MessagesBody | _ResponsesBody

_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "chat": msgspec.json.Decoder(_ChatBody),
    "completions": msgspec.json.Decoder(_CompletionBody),
    "embeddings": msgspec.json.Decoder(_EmbeddingBody),
    "messages": msgspec.json.Decoder(_MessagesBody),
    "responses": msgspec.json.Decoder(_ResponsesBody),
}
# path suffix -> (method, route kind)
_ROUTES = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completions"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/models": ("GET", "models"),
    "/v1/messages": ("POST", "messages"),
    "/v1/responses": ("POST", "responses"),
}

_encode = msgspec.json.Encoder().encode
_JSON_TYPE = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_HEALTH_BODY = b'{"status":"ok"}'
_DONE = b"data: [DONE]\n\n"
_TOKEN_JSON = _encode(TOKEN_TEXT)


def _usage(
    prompt_tokens: int, completion_tokens: int, override: dict[str, Any] | None = None
) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    return {**usage, **override} if override else usage


def _error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _injected_error(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = f"Injected fault from the fake upstream: HTTP {status} {phrase}."
    if status == 429:
        return _error_body(message, "requests", code="rate_limit_exceeded")
    return _error_body(message, "server_error" if status >= 500 else "invalid_request_error")


#: Anthropic's error type per status, as its API answers.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _anthropic_error(status: int, message: str | None = None) -> bytes:
    if message is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Overloaded" if status == 529 else "Error"
        message = f"Injected fault from the fake upstream: HTTP {status} {phrase}."
    kind = _ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return _encode({"type": "error", "error": {"type": kind, "message": message}})


def _event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), _encode(body))


def _called_tool(tools: list[dict[str, Any]] | None) -> str | None:
    """The name of the first tool of a request (OpenAI's or Anthropic's shape)."""
    if not tools:
        return None
    first = tools[0]
    function = first.get("function")
    name = function.get("name") if isinstance(function, dict) else first.get("name")
    return name if isinstance(name, str) else None


def _validation_param(message: str) -> str | None:
    """``"... - at `$.max_tokens`"`` -> ``"max_tokens"``, as OpenAI names the bad field."""
    _, found, where = message.rpartition(" - at `$.")
    return where.rstrip("`") if found else None


def _embedding(item: str | list[Any], dimensions: int) -> list[float]:
    """A unit vector derived from the input alone, so equal inputs embed equally."""
    data = item.encode() if isinstance(item, str) else _encode(item)
    values = [(byte - 127.5) / 127.5 for byte in hashlib.shake_256(data).digest(dimensions)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_TYPE, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _body_part(body: bytes) -> Message:
    """A fresh message per send: a server or middleware may keep or alter what it is given."""
    return {"type": "http.response.body", "body": body, "more_body": True}


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left first."""
    message = await receive()
    chunks: list[bytes] = []
    while True:
        if message["type"] == "http.disconnect":
            return None
        if not message.get("more_body", False):
            body: bytes = message.get("body", b"")
            return b"".join([*chunks, body]) if chunks else body
        chunks.append(message.get("body", b""))
        message = await receive()


async def _left_within(receive: Receive, seconds: float) -> bool:
    """Wait ``seconds``; True as soon as the client disconnects meanwhile (a request nobody
    waits for ends then, rather than keeping the server's shutdown waiting for it)."""
    with anyio.move_on_after(seconds):
        while (await receive())["type"] != "http.disconnect":
            await anyio.lowlevel.checkpoint()  # never starve others on a receive that won't block
        return True
    return False


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        await anyio.lowlevel.checkpoint()  # never starve the stream on a receive that won't block
    scope.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass(slots=True)
class _StreamPlan:
    """Every SSE event of one stream, encoded before the first one is sent."""

    opening: bytes
    content: bytes
    finish: bytes
    usage: bytes
    #: The stream's last bytes (Anthropic's streams end with ``message_stop`` instead).
    done: bytes = _DONE
    #: Sent once after the first half of the content chunks (empty: nothing).
    interlude: bytes = b""


_CHAT_OPENING = (
    b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}'
)
_CHAT_CONTENT = (
    b'{"index":0,"delta":{"content":' + _TOKEN_JSON + b'},"logprobs":null,"finish_reason":null}'
)
_COMPLETION_CONTENT = (
    b'{"text":' + _TOKEN_JSON + b',"index":0,"logprobs":null,"finish_reason":null}'
)


def _chunk_head(completion_id: str, object_: str, created: int, model: str) -> bytes:
    """The bytes every chunk of one stream starts with, up to its ``choices`` array."""
    return b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[' % (
        completion_id.encode(),
        object_.encode(),
        created,
        _encode(model),
    )


def _include_usage(request: _ChatBody | _CompletionBody) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _stream_plan(
    head: bytes, opening: bytes, content: bytes, finish: bytes, usage: dict[str, Any] | None
) -> _StreamPlan:
    """With a usage chunk, every earlier chunk carries ``"usage": null``, as OpenAI sends it."""
    tail = b'],"usage":null}\n\n' if usage is not None else b"]}\n\n"
    return _StreamPlan(
        opening=head + opening + tail if opening else b"",
        content=head + content + tail,
        finish=head + finish + tail,
        usage=b'%s],"usage":%s}\n\n' % (head, _encode(usage)) if usage is not None else b"",
    )


@dataclass(slots=True)
class _Exchange:
    """One request in flight: where its answer goes and where it is accounted for."""

    send: Send
    receive: Receive
    stats: UpstreamStats
    record: RequestRecord
    echo: list[tuple[bytes, bytes]]

    def settle(self, outcome: RecordOutcome) -> None:
        """Close the record and add it to the totals; only the first call counts."""
        record, stats = self.record, self.stats
        if record.outcome != "pending":
            return
        record.outcome = outcome
        stats.in_flight -= 1
        stats.by_status[record.status] += 1
        stats.prompt_tokens += record.prompt_tokens
        stats.completion_tokens += record.completion_tokens

    async def respond(self, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
        """Send a whole JSON response, settled first so a client holding it sees it counted."""
        self.record.status = status
        self.settle("completed" if status < 400 else "error")
        await _send_json(self.send, status, body, [*headers, *self.echo])


class FakeUpstream:
    """The fake upstream ASGI app.

    Routes, also under any prefix ending in ``/v1`` so that it can be mounted:
    ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings`` and
    ``GET /v1/models``; plus ``GET /healthz`` (under any prefix too), which is never counted.
    A request is checked in this order: route and method, API key (401), body (400), injected
    fault (``fail_next`` first, then ``failure_rate``); so rejected requests never consume
    ``fail_next``.
    """

    def __init__(self, config: FakeUpstreamConfig | None = None, *, seed: int | None = 0) -> None:
        self.config = config if config is not None else FakeUpstreamConfig()
        #: Draws the ``failure_rate`` faults; ``rng.seed(n)`` gives another fixed pattern.
        self.rng = random.Random(seed)
        self.stats = UpstreamStats()
        self.last_request: RecordedRequest | None = None
        #: Responses kept by ``POST /v1/responses`` (unless ``store: false``), by id, for
        #: ``GET``/``DELETE /v1/responses/{id}``.
        self.stored_responses: dict[str, bytes] = {}

    def reset(self) -> None:
        """Forget counters and the last request; requests in flight settle into the old stats."""
        self.stats = UpstreamStats()
        self.last_request = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        path: str = scope["path"]
        start = path.rfind("/v1/")
        if start < 0 and (path == "/healthz" or path.endswith("/healthz")):
            await _send_json(send, 200, _HEALTH_BODY, [])
            return
        route = _ROUTES.get(path[start:]) if start >= 0 else None
        if route is None and start >= 0 and path.startswith("/v1/responses/", start):
            route = ("GET", "stored")

        authorization: bytes | None = None
        x_api_key: bytes | None = None
        request_id: bytes | None = None
        traceparent: str | None = None
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            if name == "authorization":
                authorization = raw_value
                value = "[redacted]"
            elif name == "x-api-key":
                x_api_key = raw_value
                value = "[redacted]"
            else:
                value = raw_value.decode("latin-1")
                if name == "x-request-id" and request_id is None:
                    request_id = raw_value
                elif name == "traceparent":
                    traceparent = value
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        stats = self.stats  # a reset() mid-request must not unbalance the new counters
        stats.requests += 1
        stats.in_flight += 1
        if route is not None and route[1] == "messages" and x_api_key is not None:
            # Anthropic's clients send the key as ``x-api-key``: checked like a bearer key.
            authorization = b"Bearer " + x_api_key
        record = RequestRecord(
            path=path, has_authorization=authorization is not None, traceparent=traceparent
        )
        if request_id is not None and self.config.record_requests:
            stats.by_request_id[request_id.decode("latin-1")] = record
        echo = [(b"x-request-id", request_id)] if request_id is not None else []
        exchange = _Exchange(send, receive, stats, record, echo)
        body: bytes | None = None
        try:
            body = await _read_body(receive)
            if body is not None:
                self.last_request = RecordedRequest(scope["method"], path, headers, body)
                await self._answer(exchange, scope["method"], route, authorization, body)
        finally:
            exchange.settle("client_disconnected" if record.status or body is None else "error")

    async def _answer(
        self,
        exchange: _Exchange,
        method: str,
        route: tuple[str, str] | None,
        authorization: bytes | None,
        body: bytes,
    ) -> None:
        config = self.config
        if config.latency_s > 0 and await _left_within(exchange.receive, config.latency_s):
            return exchange.settle("client_disconnected")
        path = exchange.record.path
        if route is None:
            error = _error_body(f"Invalid URL ({method} {path})", "invalid_request_error")
            return await exchange.respond(404, error)
        expected_method, kind = route
        if kind == "messages":
            return await self._anthropic(exchange, method, authorization, body)
        if method != expected_method and kind != "stored":
            error = _error_body(f"Method not allowed ({method} {path})", "invalid_request_error")
            return await exchange.respond(405, error, (b"allow", expected_method.encode()))
        key = config.require_api_key
        if key is not None and authorization != b"Bearer " + key.encode():
            message = "Incorrect API key provided."
            if authorization is None:
                message = "You didn't provide an API key."
            error = _error_body(message, "invalid_request_error", code="invalid_api_key")
            return await exchange.respond(401, error)
        if kind == "stored":
            return await self._stored(exchange, method, path)

        request: _Body | None = None
        if kind != "models":
            try:
                request = _DECODERS[kind].decode(body)
            except msgspec.ValidationError as exc:
                message = str(exc)
                error = _error_body(message, "invalid_request_error", _validation_param(message))
                return await exchange.respond(400, error)
            except msgspec.DecodeError:
                message = "We could not parse the JSON body of your request."
                return await exchange.respond(400, _error_body(message, "invalid_request_error"))
            assert request is not None
            exchange.record.model = request.model
            exchange.record.stream = not isinstance(request, _EmbeddingBody) and bool(
                request.stream
            )

        status = self._injected_status()
        if status is not None:
            retry_after = config.retry_after_s
            if status == 429 and retry_after is not None:
                header = (b"retry-after", f"{retry_after:g}".encode())
                return await exchange.respond(status, _injected_error(status), header)
            return await exchange.respond(status, _injected_error(status))

        if isinstance(request, _ChatBody):
            await self._chat(request, exchange)
        elif isinstance(request, _CompletionBody):
            await self._completion(request, exchange)
        elif isinstance(request, _EmbeddingBody):
            await self._embeddings(request, exchange)
        elif isinstance(request, _ResponsesBody):
            await self._response(request, exchange)
        else:
            await self._models(exchange)

    async def _anthropic(
        self, exchange: _Exchange, method: str, authorization: bytes | None, body: bytes
    ) -> None:
        """``POST /v1/messages``: the same checks in the same order, Anthropic's shapes."""
        config = self.config
        if method != "POST":
            return await exchange.respond(
                405, _anthropic_error(405, "Method not allowed"), (b"allow", b"POST")
            )
        key = config.require_api_key
        if key is not None and authorization != b"Bearer " + key.encode():
            return await exchange.respond(401, _anthropic_error(401, "invalid x-api-key"))
        try:
            request = _DECODERS["messages"].decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return await exchange.respond(400, _anthropic_error(400, str(exc)))
        exchange.record.model = request.model
        exchange.record.stream = bool(request.stream)
        status = self._injected_status()
        if status is not None:
            retry_after = config.retry_after_s
            if status == 429 and retry_after is not None:
                header = (b"retry-after", f"{retry_after:g}".encode())
                return await exchange.respond(status, _anthropic_error(status), header)
            return await exchange.respond(status, _anthropic_error(status))
        await self._message(request, exchange)

    async def _message(self, request: _MessagesBody, exchange: _Exchange) -> None:
        config = self.config
        tokens, finish = self._output_tokens(request.max_tokens)
        stop_reason = "max_tokens" if finish == "length" else "end_turn"
        tool = _called_tool(request.tools) if config.tool_use else None
        if tool is not None and finish == "stop":
            stop_reason = "tool_use"
        record = exchange.record
        system = request.system
        system_messages = [{"content": system}] if system else []
        fresh = _messages_tokens([*system_messages, *request.messages])
        record.prompt_tokens = fresh + config.cache_read_tokens + config.cache_creation_tokens
        message_id = "msg_" + secrets.token_hex(12)
        usage: dict[str, Any] = {
            "input_tokens": fresh,
            "cache_creation_input_tokens": config.cache_creation_tokens,
            "cache_read_input_tokens": config.cache_read_tokens,
            "output_tokens": tokens,
        }
        if config.usage_override:
            usage.update(config.usage_override)
        tool_block = (
            {"type": "tool_use", "id": "toolu_" + secrets.token_hex(8), "name": tool, "input": {}}
            if tool is not None
            else None
        )
        if request.stream:
            start_usage = {**usage, "output_tokens": 1}
            message: dict[str, Any] = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": request.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start_usage,
            }
            if config.omit_usage:
                del message["usage"]
            opening = _event("message_start", {"type": "message_start", "message": message})
            opening += _event("ping", {"type": "ping"})
            opening += _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            content = _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": TOKEN_TEXT},
                },
            )
            finish_events = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            if tool_block is not None:
                finish_events += _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 1, "content_block": tool_block},
                )
                arguments = _encode(TOOL_INPUT).decode()
                for piece in (arguments[:5], arguments[5:]):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    finish_events += _event(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 1, "delta": delta},
                    )
                finish_events += _event(
                    "content_block_stop", {"type": "content_block_stop", "index": 1}
                )
            delta_body: dict[str, Any] = {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": tokens},
            }
            if config.omit_usage:
                del delta_body["usage"]
            finish_events += _event("message_delta", delta_body)
            plan = _StreamPlan(
                opening=opening,
                content=content,
                finish=finish_events,
                usage=b"",
                done=_event("message_stop", {"type": "message_stop"}),
            )
            return await self._stream(plan, tokens, exchange)
        record.completion_tokens = tokens
        blocks: list[dict[str, Any]] = [{"type": "text", "text": TOKEN_TEXT * tokens}]
        if tool_block is not None:
            blocks.append({**tool_block, "input": TOOL_INPUT})
        answer: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if config.omit_usage:
            del answer["usage"]
        await exchange.respond(200, _encode(answer))

    async def _response(self, request: _ResponsesBody, exchange: _Exchange) -> None:
        """``POST /v1/responses``: a Response object, or its event sequence."""
        config = self.config
        tokens, finish = self._output_tokens(request.max_output_tokens)
        record = exchange.record
        items = request.input if isinstance(request.input, list) else []
        record.prompt_tokens = (
            _text_tokens(request.input) if isinstance(request.input, str) else 0
        ) + (_messages_tokens(items) if items else 0)
        if request.instructions:
            record.prompt_tokens += _text_tokens(request.instructions)
        response_id = "resp_" + secrets.token_hex(12)
        usage: dict[str, Any] = {
            "input_tokens": record.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": record.prompt_tokens + tokens,
        }
        if config.usage_override:
            usage.update(config.usage_override)
        text = TOKEN_TEXT * tokens
        message = {
            "type": "message",
            "id": "msg_" + response_id[5:],
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        tool = _called_tool(request.tools) if config.tool_use else None
        output: list[dict[str, Any]] = [message]
        if tool is not None:
            output.append(
                {
                    "type": "function_call",
                    "id": "fc_" + response_id[5:],
                    "call_id": "call_" + secrets.token_hex(8),
                    "name": tool,
                    "arguments": _encode(TOOL_INPUT).decode(),
                    "status": "completed",
                }
            )
        body: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed" if finish == "stop" else "incomplete",
            "model": request.model,
            "output": output,
            "error": None,
            "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
            "instructions": request.instructions,
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": None,
            "top_p": None,
            "tool_choice": "auto",
            "tools": request.tools or [],
            "usage": None if config.omit_usage else usage,
        }
        if request.store is not False:
            self.stored_responses[response_id] = _encode(body)
        if not request.stream:
            record.completion_tokens = tokens
            return await exchange.respond(200, _encode(body))
        shell = {**body, "status": "in_progress", "output": [], "usage": None}
        opening = _event("response.created", {"type": "response.created", "response": shell})
        opening += _event(
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**message, "status": "in_progress", "content": []},
            },
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        opening += _event(
            "response.content_part.added",
            {"type": "response.content_part.added", **where, "part": part},
        )
        content = _event(
            "response.output_text.delta",
            {"type": "response.output_text.delta", **where, "delta": TOKEN_TEXT},
        )
        finish_events = _event(
            "response.output_text.done",
            {"type": "response.output_text.done", **where, "text": text},
        )
        finish_events += _event(
            "response.content_part.done",
            {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        )
        finish_events += _event(
            "response.output_item.done",
            {"type": "response.output_item.done", "output_index": 0, "item": message},
        )
        for index, item in enumerate(output[1:], start=1):
            finish_events += _event(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                },
            )
            finish_events += _event(
                "response.function_call_arguments.delta",
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item["id"],
                    "output_index": index,
                    "delta": item["arguments"],
                },
            )
            finish_events += _event(
                "response.function_call_arguments.done",
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": item["arguments"],
                },
            )
            finish_events += _event(
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": index, "item": item},
            )
        name = "response.completed" if finish == "stop" else "response.incomplete"
        plan = _StreamPlan(
            opening=opening,
            content=content,
            finish=finish_events,
            usage=b"",
            done=_event(name, {"type": name, "response": body}),
        )
        return await self._stream(plan, tokens, exchange)

    async def _stored(self, exchange: _Exchange, method: str, path: str) -> None:
        """``GET``/``DELETE /v1/responses/{id}`` (and ``GET .../input_items``, empty)."""
        object_id, _slash, tail = path[path.rfind("/v1/responses/") + 14 :].partition("/")
        stored = self.stored_responses.get(object_id)
        allowed = ("GET", "DELETE") if not tail else ("GET",) if tail == "input_items" else ()
        if method not in allowed:
            error = _error_body(f"Method not allowed ({method} {path})", "invalid_request_error")
            return await exchange.respond(405, error)
        if stored is None:
            message = f"No response found with id '{object_id}'."
            return await exchange.respond(404, _error_body(message, "invalid_request_error"))
        if tail:
            listing: dict[str, Any] = {
                "object": "list",
                "data": [],
                "first_id": None,
                "last_id": None,
            }
            return await exchange.respond(200, _encode({**listing, "has_more": False}))
        if method == "DELETE":
            del self.stored_responses[object_id]
            deleted = {"id": object_id, "object": "response.deleted", "deleted": True}
            return await exchange.respond(200, _encode(deleted))
        return await exchange.respond(200, stored)

    def _injected_status(self) -> int | None:
        config = self.config
        if config.fail_next:
            status = config.fail_next.pop(0)
            return None if status == 200 else status
        if config.failure_rate > 0 and self.rng.random() < config.failure_rate:
            return config.failure_status
        return None

    def _output_tokens(self, cap: int | None) -> tuple[int, str]:
        """Tokens to produce and the finish reason: ``length`` only when the cap cut it."""
        wanted = self.config.completion_tokens
        if wanted is None:
            wanted = self.config.stream_chunks
        if cap is not None and cap < wanted:
            return cap, "length"
        return wanted, "stop"

    async def _chat(self, request: _ChatBody, exchange: _Exchange) -> None:
        cap = request.max_completion_tokens
        if cap is None:
            cap = request.max_tokens
        tokens, finish = self._output_tokens(cap)
        record = exchange.record
        record.prompt_tokens = _messages_tokens(request.messages)
        completion_id, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        usage = _usage(record.prompt_tokens, tokens, self.config.usage_override)
        tool = _called_tool(request.tools) if self.config.tool_use else None
        call: dict[str, Any] | None = None
        if tool is not None:
            arguments = _encode(TOOL_INPUT).decode()
            function = {"name": tool, "arguments": arguments}
            call = {"id": "call_" + secrets.token_hex(8), "type": "function", "function": function}
            if finish == "stop":
                finish = "tool_calls"
        if request.stream:
            head = _chunk_head(completion_id, "chat.completion.chunk", created, request.model)
            plan = _stream_plan(
                head,
                _CHAT_OPENING,
                _CHAT_CONTENT,
                b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}' % finish.encode(),
                usage if self._reports_stream_usage(request) else None,
            )
            if call is not None:
                tool_delta = {"tool_calls": [{"index": 0, **call}]}
                tool_choice = {"index": 0, "delta": tool_delta, "finish_reason": None}
                tool_chunk = head + _encode(tool_choice) + b"]}\n\n"
                if self.config.tool_call_mid_text:
                    plan.interlude = tool_chunk
                else:
                    plan.finish = tool_chunk + plan.finish
            return await self._stream(plan, tokens, exchange)
        record.completion_tokens = tokens
        message: dict[str, Any] = {
            "role": "assistant",
            "content": TOKEN_TEXT * tokens,
            "refusal": None,
        }
        if call is not None:
            message["tool_calls"] = [call]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [choice],
            "usage": usage,
        }
        if self.config.omit_usage:
            del body["usage"]
        await exchange.respond(200, _encode(body))

    async def _completion(self, request: _CompletionBody, exchange: _Exchange) -> None:
        tokens, finish = self._output_tokens(request.max_tokens)
        record = exchange.record
        record.prompt_tokens = _text_tokens(request.prompt)
        completion_id, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        usage = _usage(record.prompt_tokens, tokens, self.config.usage_override)
        if request.stream:
            plan = _stream_plan(
                _chunk_head(completion_id, "text_completion", created, request.model),
                b"",
                _COMPLETION_CONTENT,
                b'{"text":"","index":0,"logprobs":null,"finish_reason":"%s"}' % finish.encode(),
                usage if self._reports_stream_usage(request) else None,
            )
            return await self._stream(plan, tokens, exchange)
        record.completion_tokens = tokens
        text = TOKEN_TEXT * tokens
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        body = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": [choice],
            "usage": usage,
        }
        if self.config.omit_usage:
            del body["usage"]
        await exchange.respond(200, _encode(body))

    def _reports_stream_usage(self, request: _ChatBody | _CompletionBody) -> bool:
        return _include_usage(request) and not self.config.omit_usage

    async def _stream(self, plan: _StreamPlan, tokens: int, exchange: _Exchange) -> None:
        """Send ``plan``; stop producing once the client is gone, counting only sent chunks.

        uvicorn's ``send`` stays silent after a disconnect, so when chunks are paced a watcher
        task turns ``http.disconnect`` into cancellation. Unpaced streams are written in one go
        and skip the watcher (a task group costs more than the whole stream); there only a
        ``send`` raising ``OSError`` can stop them early.
        """
        exchange.record.status = 200
        headers = _SSE_HEADERS + exchange.echo
        await exchange.send({"type": "http.response.start", "status": 200, "headers": headers})
        broke = False
        if self.config.chunk_delay_s > 0:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_cancel_on_disconnect, exchange.receive, tasks.cancel_scope)
                broke = await self._emit(plan, tokens, exchange)
                tasks.cancel_scope.cancel()
        else:
            broke = await self._emit(plan, tokens, exchange)
        if broke:
            exchange.settle("stream_failed")
            count = exchange.record.completion_tokens
            raise InjectedStreamError(f"fake upstream broke the stream after {count} chunks")
        exchange.settle("client_disconnected")  # a no-op when it completed

    async def _emit(self, plan: _StreamPlan, tokens: int, exchange: _Exchange) -> bool:
        """Send the events of ``plan``; True when ``fail_stream_after`` says to break off."""
        delay = self.config.chunk_delay_s
        break_after = self.config.fail_stream_after
        send, record = exchange.send, exchange.record
        try:
            if plan.opening:
                await send(_body_part(plan.opening))
            for sent in range(tokens if break_after is None else min(tokens, break_after)):
                if plan.interlude and sent == tokens // 2:
                    await send(_body_part(plan.interlude))
                if delay > 0:
                    await anyio.sleep(delay)
                await send(_body_part(plan.content))
                record.completion_tokens += 1
            if break_after is not None:
                return True
            if delay > 0:
                await anyio.sleep(delay)
            exchange.settle("completed")  # before [DONE] leaves, as in respond()
            await send({"type": "http.response.body", "body": plan.finish + plan.usage + plan.done})
        except OSError:
            pass
        return False

    async def _embeddings(self, request: _EmbeddingBody, exchange: _Exchange) -> None:
        value = request.input
        items: list[Any]
        if isinstance(value, str) or (value and all(isinstance(v, int) for v in value)):
            items = [value]  # one text, or one array of token ids
        else:
            items = value
        if not items:
            error = _error_body("'input' must not be empty.", "invalid_request_error", "input")
            return await exchange.respond(400, error)
        exchange.record.prompt_tokens = prompt_tokens = _text_tokens(value)
        dimensions = request.dimensions or EMBEDDING_DIMENSIONS
        data: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            vector = _embedding(item, dimensions)
            embedding: list[float] | str = vector
            if request.encoding_format == "base64":
                packed = struct.pack(f"<{dimensions}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        body = {"object": "list", "data": data, "model": request.model, "usage": usage}
        await exchange.respond(200, _encode(body))

    async def _models(self, exchange: _Exchange) -> None:
        listed = [
            {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "tenantware"}
            for model in self.config.models
        ]
        await exchange.respond(200, _encode({"object": "list", "data": listed}))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tenantware.testing.upstream``: serve the fake alone, for benchmarks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=5, help="output tokens per completion")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument(
        "--record", action="store_true", help="keep a record per x-request-id (grows memory)"
    )
    args = parser.parse_args(argv)
    config = msgspec.convert(
        {
            "latency_s": args.latency_ms / 1000,
            "stream_chunks": args.chunks,
            "chunk_delay_s": args.chunk_delay_ms / 1000,
            "require_api_key": args.api_key,
            "record_requests": args.record,
        },
        FakeUpstreamConfig,
    )
    import uvicorn

    uvicorn.run(
        FakeUpstream(config),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
