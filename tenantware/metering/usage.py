"""Usage extraction from OpenAI-format responses, JSON or SSE, without re-encoding anything.

Shared by the proxy (which sees the upstream stream) and the metering layer (which taps the
responses of apps that are not the proxy). Each SSE event is decoded into a tiny struct that
skips every field but the few counted here.
"""

from __future__ import annotations

import msgspec

from tenantware.context import Usage
from tenantware.estimate import estimate_text_tokens

__all__ = ["StreamTap", "parse_json_usage"]


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = 0


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = 0


class _OpenAIUsage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None

    def to_usage(self) -> Usage:
        cached = self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details else 0
        reasoning = (
            self.completion_tokens_details.reasoning_tokens if self.completion_tokens_details else 0
        )
        return Usage(
            input_tokens=self.prompt_tokens,
            output_tokens=self.completion_tokens,
            cached_tokens=cached or 0,
            reasoning_tokens=reasoning or 0,
        )


class _Response(msgspec.Struct, gc=False):
    model: str | None = None
    usage: _OpenAIUsage | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    text: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    model: str | None = None
    choices: list[_Choice] = []
    usage: _OpenAIUsage | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def parse_json_usage(body: bytes) -> tuple[Usage | None, str | None]:
    """``(usage, model)`` of a JSON completion/embedding response; ``None`` where absent."""
    try:
        response = _decode_response(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
    return (response.usage.to_usage() if response.usage else None), response.model


class StreamTap:
    """Splits an SSE byte stream into whole events, taps usage and counts relayed text.

    ``feed`` returns the bytes to forward now (only complete events; a partial event waits for
    its end). With ``hide_usage`` the usage-only chunk that the gateway asked for on the
    client's behalf is swallowed after its usage is recorded.
    """

    __slots__ = ("_pending", "content_chars", "events", "hide_usage", "model", "usage")

    def __init__(self, *, hide_usage: bool = False) -> None:
        self.hide_usage = hide_usage
        self._pending = b""
        self.usage: Usage | None = None
        self.model: str | None = None
        self.content_chars = 0
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        data = self._pending + chunk if self._pending else chunk
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
        except (msgspec.DecodeError, msgspec.ValidationError):
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
            self.usage = parsed.usage.to_usage()
            if not choices and self.hide_usage:
                return False
        return True

    def estimated_output_tokens(self) -> int:
        """Output tokens of what was relayed, for streams whose usage never came."""
        return estimate_text_tokens(self.content_chars)
