"""Server-sent events split into whole events, for the stream translators.

A translator must see each event whole (its ``event:`` and ``data:`` lines together) before it
can write the other format's events; bytes of an incomplete event wait for the next read.
"""

from __future__ import annotations

__all__ = ["EventSplitter", "parse_event", "sse_event"]


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
