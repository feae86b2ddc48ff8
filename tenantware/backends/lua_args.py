"""Script arguments as MessagePack: a few ``ARGV`` strings instead of one per value.

Inside a Redis script each ``ARGV`` element and each ``tonumber`` of it costs about as much
as a command (``benchmarks/README.md``, "Leaner scripts"); ``cmsgpack.unpack`` (built into
Redis) turns one string into Lua numbers and strings in one C call. ``pack_values`` writes
values as consecutive MessagePack objects, which ``cmsgpack.unpack`` returns as that many
Lua values (no table built value by value); the static part of a call (a plan's limits, a
pool's terms) is packed once by its owner and the per-call part appended. Integers stay
exact up to 2**53 (Lua numbers are doubles), which covers microsecond times, tokens and
nano-dollars. An integer a script only hands to a command is best sent as a string too:
Redis formats a Lua number with ``snprintf`` on every ``redis.call``.
"""

from __future__ import annotations

from collections.abc import Sequence

from msgspec.msgpack import Encoder

__all__ = ["pack_values"]

_ENCODER = Encoder()
#: A MessagePack fixarray (up to 15 elements) has a one-byte header, an array16 three bytes.
_MAX_FIXARRAY = 15

Value = int | float | str | bytes | Sequence[int | float | str]


def pack_values(*values: Value) -> bytes:
    """``values`` as consecutive MessagePack objects (``cmsgpack.unpack`` returns each as a
    Lua value; ``{cmsgpack.unpack(s)}`` makes a list of them without a table per value)."""
    packed = _ENCODER.encode(values)
    # Drop the array's header: one byte up to 15 values, three up to 65535.
    return packed[1:] if len(values) <= _MAX_FIXARRAY else packed[3:]
