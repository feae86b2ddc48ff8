"""What is kept of a cached answer: the bytes the client got, how to send them again, and the
usage of the answer (reported with the cached outcome)."""

from __future__ import annotations

from typing import Final

import msgspec

from tenantware.context import Usage

__all__ = ["CachedAnswer", "decode_answer", "encode_answer"]


class CachedAnswer(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    status: int
    content_type: bytes
    #: The whole body as relayed; for a stream, its SSE events in order.
    body: bytes
    stream: bool
    model_served: str | None = None
    usage: Usage | None = None
    #: Unix time the answer was produced.
    created_at: float = 0.0


_encode: Final = msgspec.msgpack.Encoder().encode
_decode: Final = msgspec.msgpack.Decoder(CachedAnswer).decode


def encode_answer(answer: CachedAnswer) -> bytes:
    return _encode(answer)


def decode_answer(data: bytes) -> CachedAnswer:
    """``msgspec.DecodeError`` / ``ValidationError`` for bytes that are not an answer."""
    return _decode(data)
