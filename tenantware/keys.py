"""API keys are stored and compared only as hashes; a presented key is hashed here and then
dropped, never stored, logged or compared in plain.

``sha256:<hex>`` needs no secret; ``hmac-sha256:<hex>`` binds the hashes to a server secret so
a leaked config file cannot be used to test guessed keys offline.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["KeyHasher", "generate_key"]


class KeyHasher:
    """Hashes presented keys the same way the configured hashes were made."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret

    @property
    def scheme(self) -> str:
        return "hmac-sha256" if self._secret else "sha256"

    def hash(self, key: str | bytes) -> str:
        """The stored form of ``key``: ``<scheme>:<hex digest>``."""
        raw = key.encode() if isinstance(key, str) else key
        if self._secret:
            return "hmac-sha256:" + hmac.new(self._secret, raw, hashlib.sha256).hexdigest()
        return "sha256:" + hashlib.sha256(raw).hexdigest()


def generate_key(prefix: str = "tw") -> str:
    """A new random API key (256 bits of entropy)."""
    return f"{prefix}-{secrets.token_urlsafe(32)}"
