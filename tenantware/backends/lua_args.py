"""Script arguments as MessagePack: a few ``ARGV`` strings instead of one per value.

Inside a Redis script each ``ARGV`` element and each ``tonumber`` of it costs about as much
as a command (``benchmarks/README.md``, "Leaner scripts"); ``cmsgpack.unpack`` (built into
Redis) turns one string into Lua numbers and strings in one C call. ``pack_values`` writes
values as consecutive MessagePack objects, which ``cmsgpack.unpack`` returns as that many
Lua values (no table to build); ``pack_list`` writes one array (a Lua table), for a part
whose length varies, packed once and cached by its owner (a plan's limits, a pool's terms).
Integers stay exact up to 2**53 (Lua numbers are doubles), which covers microsecond times,
tokens and nano-dollars.
"""

from __future__ import annotations

from collections.abc import Sequence

from msgspec.msgpack import Encoder

__all__ = ["pack_list", "pack_values"]

_ENCODER = Encoder()
#: A MessagePack fixarray (up to 15 elements) has a one-byte header.
_MAX_VALUES = 15

Value = int | float | str | bytes | Sequence[int | float | str]


def pack_values(*values: Value) -> bytes:
    """``values`` (at most 15) as consecutive MessagePack objects."""
    if len(values) > _MAX_VALUES:
        raise ValueError(f"at most {_MAX_VALUES} values, got {len(values)}")
    return _ENCODER.encode(values)[1:]  # the array's values without its one-byte header


def pack_list(values: Sequence[int | float | str]) -> bytes:
    """``values`` as one MessagePack array (a Lua table once unpacked)."""
    return _ENCODER.encode(values)
