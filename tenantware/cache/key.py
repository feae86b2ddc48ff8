"""What makes two requests the same: the route, the canonical model and every body field
that can change the answer, with JSON key order and spacing normalised.

Fields that only label a request (``user``, ``metadata``, ...) are left out. The digest is
keyed with the tenant's own lookup key (``TenantKeys.lookup_key``): the same bytes sent by
two tenants give two unrelated keys, and a key reveals nothing about the prompt.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from tenantware.crypto import TenantKeys

__all__ = ["IGNORED_FIELDS", "cache_key", "canonical_request"]

#: Body fields that never change what the model answers.
IGNORED_FIELDS: Final = frozenset(
    {"user", "metadata", "store", "safety_identifier", "prompt_cache_key", "service_tier"}
)
_decode: Final = msgspec.json.Decoder().decode
_encode: Final = msgspec.json.Encoder(order="sorted").encode


def canonical_request(path: str, model: str, body: bytes) -> bytes | None:
    """The request as compared, or ``None`` when the body is not a JSON object."""
    try:
        fields: Any = _decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(fields, dict):
        return None
    kept = {name: value for name, value in fields.items() if name not in IGNORED_FIELDS}
    kept["model"] = model
    return path.encode() + b"\x00" + _encode(kept)


def cache_key(keys: TenantKeys, canonical: bytes) -> str:
    """The store key of a canonical request for the tenant ``keys`` belong to (hex)."""
    return keys.lookup_key(canonical).hex()
