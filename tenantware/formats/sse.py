"""Server-sent events split into whole events, for the stream translators.

A translator must see each event whole (its ``event:`` and ``data:`` lines together) before it
can write the other format's events; bytes of an incomplete event wait for the next read.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tenantware.context import Usage
from tenantware.estimate import estimate_text_tokens
from tenantware.metering.usage import USAGE_BOUNDS, checked_usage

__all__ = [
    "EventSplitter",
    "FromChatStream",
    "TranslatingStream",
    "json_object",
    "parse_event",
    "sse_event",
]

_decode = msgspec.json.Decoder().decode


class EventSplitter:
    """``feed(chunk)`` returns the complete events so far (without their blank line)."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return []
        self._pending = data[end + 2 :]
        return [event for event in data[:end].split(b"\n\n") if event.strip()]

    def flush(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest, self._pending = self._pending, b""
        return [rest] if rest.strip() else []


def parse_event(event: bytes) -> tuple[bytes, bytes]:
    """``(name, data)`` of one event: the ``event:`` field (empty when absent) and the
    ``data:`` lines joined."""
    name = b""
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, b"\n".join(data)


def sse_event(name: str | None, data: bytes) -> bytes:
    """One encoded event (a named one when ``name`` is given)."""
    if name is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class TranslatingStream:
    """What every stream tap holds: whole events, the usage, the model, the text relayed."""

    def __init__(self) -> None:
        self._events = EventSplitter()
        self.bounds = USAGE_BOUNDS.get()
        self.usage: Usage | None = None
        self.model: str | None = None
        self.content_chars = 0

    def feed(self, chunk: bytes) -> bytes:
        out = [self._on_event(event) for event in self._events.feed(chunk)]
        return b"".join(out)

    def flush(self) -> bytes:
        out = [self._on_event(event) for event in self._events.flush()]
        return b"".join(out) + self._finish()

    def estimated_output_tokens(self) -> int:
        return estimate_text_tokens(self.content_chars)

    def _on_event(self, event: bytes) -> bytes:
        raise NotImplementedError

    def _finish(self) -> bytes:
        return b""


class FromChatStream(TranslatingStream):
    """A chat completion chunk stream written as another format: ``[DONE]``, the upstream's
    error chunk, the model, each choice's delta and the usage chunk are read here once; the
    subclass writes its own events (``_start``, ``_on_delta``, ``_on_error``, ``_end``)."""

    def __init__(self) -> None:
        super().__init__()
        self._started = self._ended = False
        self._finish_reason: str | None = None

    def _on_event(self, event: bytes) -> bytes:
        _name, data = parse_event(event)
        if data == b"[DONE]":
            return self._end()
        chunk = json_object(data)
        if chunk is None or self._ended:
            return b""
        if "error" in chunk:
            self._ended = True
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            return self._on_error(error)
        out: list[bytes] = []
        if isinstance(chunk.get("model"), str) and self.model is None:
            self.model = chunk["model"]
        if not self._started:
            self._started = True
            out.append(self._start())
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            out.extend(self._on_delta(choice.get("delta") or {}))
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = checked_usage(usage, self.bounds, self.estimated_output_tokens)
        return b"".join(out)

    def _start(self) -> bytes:
        raise NotImplementedError

    def _on_delta(self, delta: dict[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def _on_error(self, error: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _end(self) -> bytes:
        raise NotImplementedError

    def _finish(self) -> bytes:
        return self._end()


def json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = _decode(data)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None
