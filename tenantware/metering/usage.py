"""Usage extraction from OpenAI-format responses, JSON or SSE, without re-encoding anything.

Shared by the proxy (which sees the upstream stream) and the metering layer (which taps the
responses of apps that are not the proxy). Each SSE event is decoded into a tiny struct that
skips every field but the few counted here.

An upstream's numbers are untrusted: a negative count would be billed as a credit and refund
the tenant's token limit, a huge one overflows the ledger's 64-bit columns and locks the
tenant out. So every count is checked against what the request could have produced
(``UsageBounds``) where it is read, before any layer (quota settlement, the ledger) sees it:
an unusable count is replaced by the gateway's estimate when there is one, else clamped into
range, and the usage names what was wrong (``Usage.anomalies``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Final

import msgspec

from tenantware.context import RequestContext, Usage
from tenantware.estimate import estimate_text_tokens

__all__ = [
    "DEFAULT_BOUNDS",
    "MAX_USAGE_TOKENS",
    "PROMPT_ALLOWANCE_TOKENS",
    "USAGE_BOUNDS",
    "StreamTap",
    "UsageBounds",
    "bound_usage",
    "checked_usage",
    "estimate_json_usage",
    "parse_json_usage",
]

#: The most tokens any usage field may hold: above any model's window, and far enough below
#: the ledger's 64-bit integers that a count times a price in nano-dollars still fits.
MAX_USAGE_TOKENS: Final = 1_000_000_000
#: Prompt tokens a request may use beyond one per byte of its body, times four: images and
#: files passed by reference are counted by the upstream but take few bytes here.
PROMPT_ALLOWANCE_TOKENS: Final = 65_536
_PROMPT_TOKENS_PER_BYTE: Final = 4

NEGATIVE: Final = "negative"
TOO_LARGE: Final = "too_large"
MALFORMED: Final = "malformed"
INCONSISTENT: Final = "inconsistent"


class UsageBounds(msgspec.Struct, frozen=True, gc=False):
    """What one request could produce, and the estimate that replaces an unusable count."""

    max_input: int = MAX_USAGE_TOKENS
    max_output: int = MAX_USAGE_TOKENS
    #: The gateway's prompt estimate (0: none), billed when the upstream's count is unusable.
    prompt_estimate: int = 0

    @classmethod
    def for_request(cls, ctx: RequestContext, max_output_tokens: int) -> UsageBounds:
        """Prompt: a generous multiple of the body's size; output: ``max_tokens`` x ``n``, or
        ``max_output_tokens`` when the request set no cap."""
        max_input = len(ctx.body) * _PROMPT_TOKENS_PER_BYTE + PROMPT_ALLOWANCE_TOKENS
        if max_input > MAX_USAGE_TOKENS:
            max_input = MAX_USAGE_TOKENS
        max_output = max_output_tokens
        view = ctx.view
        if view is not None:
            cap = view.max_completion_tokens
            if cap is None:
                cap = view.max_tokens
            if cap is not None:
                n = view.n
                max_output = cap * n if n is not None and n > 1 else cap
                if max_output < 0:
                    max_output = 0
                elif max_output > MAX_USAGE_TOKENS:
                    max_output = MAX_USAGE_TOKENS
        estimate = ctx.estimated_prompt_tokens
        if not 0 <= estimate <= MAX_USAGE_TOKENS:
            estimate = 0 if estimate < 0 else MAX_USAGE_TOKENS
        return cls(max_input, max_output, estimate)


DEFAULT_BOUNDS: Final = UsageBounds()

#: The bounds of the request being served, set by ``MeteringMiddleware`` around the inner
#: app, so that any usage read below it (the proxy, a user's app) is checked against them
#: without plumbing; outside a metered request, only the absolute limits apply.
USAGE_BOUNDS: ContextVar[UsageBounds] = ContextVar(
    "tenantware_usage_bounds", default=DEFAULT_BOUNDS
)


def _count(container: object, name: str, *, required: bool = False) -> int | str:
    """The count ``container[name]``, or the anomaly that makes it unusable; absent or null
    is 0 unless ``required`` (every answer counts its prompt; embeddings have no output)."""
    value = container.get(name) if isinstance(container, dict) else None
    if value is None:
        return MALFORMED if required else 0
    if type(value) is not int:  # bool, float, string, object: not a token count
        return MALFORMED
    return NEGATIVE if value < 0 else value


def checked_usage(
    raw: object, bounds: UsageBounds, estimate_output: Callable[[], int] | None = None
) -> Usage:
    """The decoded JSON ``usage`` object ``raw`` as a ``Usage`` inside ``bounds``; never raises.

    An unusable input count becomes the prompt estimate (``estimated``) when there is one,
    an unusable output count what ``estimate_output`` says (the relayed text); without an
    estimate a count is clamped (negative or malformed: 0, too large: the bound). Cached and
    reasoning tokens never exceed the input and output they are part of.
    """
    anomalies: list[str] = []
    if isinstance(raw, dict):
        prompt = _count(raw, "prompt_tokens", required=True)
        completion = _count(raw, "completion_tokens")
    else:
        prompt = completion = MALFORMED
    estimate = bounds.prompt_estimate
    input_tokens, input_estimated = _resolve(
        prompt, bounds.max_input, (lambda: estimate) if estimate else None, anomalies
    )
    output_tokens, output_estimated = _resolve(
        completion, bounds.max_output, estimate_output, anomalies
    )
    details = raw.get("prompt_tokens_details") if isinstance(raw, dict) else None
    cached = _part(_count(details, "cached_tokens"), input_tokens, anomalies)
    details = raw.get("completion_tokens_details") if isinstance(raw, dict) else None
    reasoning = _part(_count(details, "reasoning_tokens"), output_tokens, anomalies)
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        estimated=input_estimated or output_estimated,
        anomalies=tuple(dict.fromkeys(anomalies)),
    )


def _resolve(
    count: int | str, bound: int, estimate: Callable[[], int] | None, anomalies: list[str]
) -> tuple[int, bool]:
    """``(tokens, estimated)`` for a count: itself when usable, else the estimate, else
    clamped into ``[0, bound]``."""
    if isinstance(count, int):
        if count <= bound:
            return count, False
        count = TOO_LARGE
    anomalies.append(count)
    if estimate is not None:
        return min(max(estimate(), 0), bound), True
    return (bound if count == TOO_LARGE else 0), False


def _part(count: int | str, whole: int, anomalies: list[str]) -> int:
    """A count that is part of ``whole`` (cached of input, reasoning of output)."""
    if isinstance(count, str):
        anomalies.append(count)
        return 0
    if count > whole:
        anomalies.append(INCONSISTENT)
        return whole
    return count


def bound_usage(usage: Usage, bounds: UsageBounds) -> Usage:
    """``usage`` (set by any app) checked against ``bounds``; the same object when inside.

    The gateway's own estimate (``estimated``, e.g. the text of a cut stream counted) is only
    clamped: it is not the upstream's number, so not an anomaly."""
    if (
        0 <= usage.input_tokens <= bounds.max_input
        and 0 <= usage.output_tokens <= bounds.max_output
        and 0 <= usage.cached_tokens <= usage.input_tokens
        and 0 <= usage.reasoning_tokens <= usage.output_tokens
    ):
        return usage
    raw = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    checked = checked_usage(raw, UsageBounds(bounds.max_input, bounds.max_output))
    found = () if usage.estimated else checked.anomalies
    return msgspec.structs.replace(
        checked,
        estimated=usage.estimated,
        anomalies=tuple(dict.fromkeys(usage.anomalies + found)),
    )


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = 0


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = 0


class _TypedUsage(msgspec.Struct, gc=False):
    """The usual shape, decoded without building dicts; any other shape fails validation and
    is decoded again as plain JSON for ``checked_usage``."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def checked(self, bounds: UsageBounds, estimate_output: Callable[[], int] | None) -> Usage:
        prompt = self.prompt_tokens
        completion = self.completion_tokens or 0
        details = self.prompt_tokens_details
        cached = (details.cached_tokens or 0) if details is not None else 0
        more = self.completion_tokens_details
        reasoning = (more.reasoning_tokens or 0) if more is not None else 0
        if (
            prompt is not None
            and 0 <= prompt <= bounds.max_input
            and 0 <= completion <= bounds.max_output
            and 0 <= cached <= prompt
            and 0 <= reasoning <= completion
        ):
            return Usage(prompt, completion, cached, reasoning)
        raw = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
        return checked_usage(raw, bounds, estimate_output)


class _Response(msgspec.Struct, gc=False):
    model: str | None = None
    usage: _TypedUsage | None = None


class _AnyResponse(msgspec.Struct, gc=False):
    model: object = None
    #: Any JSON: checked field by field, so a hostile value never fails the whole decode.
    usage: object = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    text: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    model: str | None = None
    choices: list[_Choice] = []
    usage: _TypedUsage | None = None


class _AnyChunk(msgspec.Struct, gc=False):
    model: object = None
    choices: object = None
    usage: object = None


class _Function(msgspec.Struct, gc=False):
    arguments: str | None = None


class _ToolCall(msgspec.Struct, gc=False):
    function: _Function | None = None


class _Message(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _AnsweredChoice(msgspec.Struct, gc=False):
    message: _Message | None = None
    text: str | None = None


class _Answer(msgspec.Struct, gc=False):
    choices: list[_AnsweredChoice] | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_any_response = msgspec.json.Decoder(_AnyResponse).decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_any_chunk = msgspec.json.Decoder(_AnyChunk).decode
_decode_answer = msgspec.json.Decoder(_Answer).decode


def _json_output_estimate(body: bytes) -> int:
    """Output tokens of a JSON completion counted from its text (answers, reasoning, tool
    arguments); 0 when the body is not a completion."""
    try:
        answer = _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return 0
    chars = 0
    for choice in answer.choices or ():
        message = choice.message
        if message is not None:
            chars += len(message.content or "") + len(message.reasoning_content or "")
            for call in message.tool_calls or ():
                if call.function is not None:
                    chars += len(call.function.arguments or "")
        elif choice.text:
            chars += len(choice.text)
    return estimate_text_tokens(chars)


def parse_json_usage(
    body: bytes, bounds: UsageBounds | None = None
) -> tuple[Usage | None, str | None]:
    """``(usage, model)`` of a JSON completion/embedding response; ``None`` where absent.

    The usage is checked against ``bounds`` (default: the current request's, see
    ``USAGE_BOUNDS``)."""
    bounds = bounds or USAGE_BOUNDS.get()
    try:
        response = _decode_response(body)
    except msgspec.ValidationError:
        return _parse_any_json_usage(body, bounds)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
        return None, None
    if response.usage is None:
        return None, response.model
    return response.usage.checked(bounds, lambda: _json_output_estimate(body)), response.model


def _parse_any_json_usage(body: bytes, bounds: UsageBounds) -> tuple[Usage | None, str | None]:
    """``parse_json_usage`` of an answer whose usage (or model) is not of the usual shape."""
    try:
        response = _decode_any_response(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None, None
    model = response.model if isinstance(response.model, str) else None
    if response.usage is None:
        return None, model
    return checked_usage(response.usage, bounds, lambda: _json_output_estimate(body)), model


def estimate_json_usage(body: bytes, bounds: UsageBounds | None = None) -> Usage:
    """The usage of a JSON completion that reported none: the request's prompt estimate and
    the answer's text counted by the gateway (``estimated``)."""
    bounds = bounds or USAGE_BOUNDS.get()
    return Usage(
        input_tokens=min(bounds.prompt_estimate, bounds.max_input),
        output_tokens=min(_json_output_estimate(body), bounds.max_output),
        estimated=True,
    )


class StreamTap:
    """Splits an SSE byte stream into whole events, taps usage and counts relayed text.

    ``feed`` returns the bytes to forward now (only complete events; a partial event waits for
    its end). With ``hide_usage`` the usage-only chunk that the gateway asked for on the
    client's behalf is swallowed after its usage is recorded. The usage is checked against
    ``bounds`` (default: the current request's, see ``USAGE_BOUNDS``).
    """

    __slots__ = ("_pending", "bounds", "content_chars", "events", "hide_usage", "model", "usage")

    def __init__(self, *, hide_usage: bool = False, bounds: UsageBounds | None = None) -> None:
        self.hide_usage = hide_usage
        self.bounds = bounds or USAGE_BOUNDS.get()
        self._pending = b""
        self.usage: Usage | None = None
        self.model: str | None = None
        self.content_chars = 0
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            # On the joined bytes: a CRLF may be cut between two reads.
            data = data.replace(b"\r\n", b"\n")
        first = data.find(b"\n\n")
        if first < 0:
            self._pending = data
            return b""
        if first == len(data) - 2:
            # The usual case: the chunk is exactly one whole event; no split, no join.
            self._pending = b""
            return data if self._inspect(data, first) or not self.hide_usage else b""
        end = data.rfind(b"\n\n")
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if not self.hide_usage:
            for event in complete.split(b"\n\n")[:-1]:
                self._inspect(event, len(event))
            return complete
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if self._inspect(event, len(event)):
                kept.append(event)
                kept.append(b"\n\n")
        return b"".join(kept)

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the stream ends."""
        rest, self._pending = self._pending, b""
        return rest

    def _inspect(self, data: bytes, end: int) -> bool:
        """Record what the event ``data[:end]`` carries; ``False`` if it must not be forwarded."""
        if data.startswith(b"data: {"):
            # The usual shape: no strip (the decoder skips trailing whitespace itself).
            payload = data[6:end]
        elif data.startswith(b"data:"):
            payload = data[5:end].strip()
            if not payload.startswith(b"{"):  # ``[DONE]`` and anything not JSON
                return True
        else:
            return True
        self.events += 1
        try:
            parsed = _decode_chunk(payload)
        except msgspec.ValidationError:
            return self._inspect_any(payload)
        except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
            return True
        if self.model is None and parsed.model:
            self.model = parsed.model
        choices = parsed.choices
        for choice in choices:
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    self.content_chars += len(delta.content)
                if delta.reasoning_content:
                    self.content_chars += len(delta.reasoning_content)
            elif choice.text:
                self.content_chars += len(choice.text)
        if parsed.usage is not None:
            self.usage = parsed.usage.checked(self.bounds, self.estimated_output_tokens)
            if not choices and self.hide_usage:
                return False
        return True

    def _inspect_any(self, payload: bytes) -> bool:
        """An event of an unusual shape (hostile usage, odd fields): its usage is checked
        field by field; its text is not counted (it could not be read as a chunk)."""
        try:
            parsed = _decode_any_chunk(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return True
        if self.model is None and isinstance(parsed.model, str) and parsed.model:
            self.model = parsed.model
        if parsed.usage is not None:
            self.usage = checked_usage(parsed.usage, self.bounds, self.estimated_output_tokens)
            if not parsed.choices and self.hide_usage:
                return False
        return True

    def estimated_output_tokens(self) -> int:
        """Output tokens of what was relayed, for streams whose usage never came."""
        return estimate_text_tokens(self.content_chars)
