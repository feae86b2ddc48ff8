"""Tenants' own upstream keys sealed at rest: AES-256-GCM under the gateway's secrets key.

The secrets key (32 random bytes, URL-safe base64) is read from the environment variable
``gateway.secrets_key_env`` (default ``TENANTWARE_SECRETS_KEY``), never from a file. Each
sealed value is bound to its tenant and upstream (associated data), so a sealed key copied
to another tenant's record does not open. ``cryptography`` is an optional dependency
(``pip install 'tenantware[byok]'``), imported when a key is first sealed or opened.
"""

from __future__ import annotations

import base64
import os
import secrets
from functools import lru_cache
from typing import Any, Final

__all__ = ["DEFAULT_SECRETS_ENV", "SealError", "new_secrets_key", "open_key", "seal_key"]

DEFAULT_SECRETS_ENV: Final = "TENANTWARE_SECRETS_KEY"
_PREFIX: Final = "v1:"
_NONCE: Final = 12


class SealError(ValueError):
    """No usable secrets key, or a sealed value that does not open (tampered, other key)."""


def new_secrets_key() -> str:
    """A fresh secrets key for the environment variable."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@lru_cache(maxsize=8)
def _cipher(encoded: str) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - depends on the install
        raise SealError("own upstream keys need: pip install 'tenantware[byok]'") from None
    try:
        raw = base64.urlsafe_b64decode(encoded.encode())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SealError("the secrets key must be 32 bytes in URL-safe base64")
    return AESGCM(raw)


def _key_from(env: str) -> Any:
    encoded = os.environ.get(env, "")
    if not encoded:
        raise SealError(f"${env} is not set: own upstream keys cannot be sealed or opened")
    return _cipher(encoded)


def _context(tenant_id: str, upstream: str) -> bytes:
    return f"tenantware:{tenant_id}:{upstream}".encode()


def seal_key(plain: str, tenant_id: str, upstream: str, *, env: str = DEFAULT_SECRETS_ENV) -> str:
    """``plain`` sealed for ``tenant_id``'s calls to ``upstream``."""
    nonce = secrets.token_bytes(_NONCE)
    sealed = _key_from(env).encrypt(nonce, plain.encode(), _context(tenant_id, upstream))
    return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def open_key(sealed: str, tenant_id: str, upstream: str, *, env: str = DEFAULT_SECRETS_ENV) -> str:
    """The key sealed by ``seal_key`` for the same tenant and upstream."""
    from cryptography.exceptions import InvalidTag

    if not sealed.startswith(_PREFIX):
        raise SealError("not a sealed value")
    try:
        data = base64.urlsafe_b64decode(sealed[len(_PREFIX) :].encode())
        plain: bytes = _key_from(env).decrypt(
            data[:_NONCE], data[_NONCE:], _context(tenant_id, upstream)
        )
    except (InvalidTag, ValueError):
        raise SealError("the sealed key does not open with this secrets key") from None
    return plain.decode()
