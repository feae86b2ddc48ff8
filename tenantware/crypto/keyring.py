"""Each tenant's keys: derived once (HKDF), cached in the process, used to seal and open.

A sealed value is ``format (1 byte) | master key version (4 bytes) | nonce (12) | AES-GCM
ciphertext and tag``, with the tenant id as associated data: a value moved into another
tenant's row, or opened with another tenant's key, fails authentication instead of yielding
someone else's data. The version lets a value sealed before a master key rotation be opened
(and re-sealed under the current key, lazily) while the old key is still provided.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import TYPE_CHECKING, Final

import anyio

from tenantware.crypto.material import TenantKeyStore
from tenantware.crypto.providers import KeyProvider, MasterKeys, MissingMasterKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KeyRing", "TenantKeys", "Undecryptable"]

_FORMAT: Final = 1
_HEADER: Final = struct.Struct(">BI")
_NONCE_BYTES: Final = 12
_OVERHEAD: Final = _HEADER.size + _NONCE_BYTES + 16
_DATA_KEY_INFO: Final = b"tenantware data key\x00"
_LOOKUP_KEY_INFO: Final = b"tenantware lookup key\x00"


class Undecryptable(ValueError):
    """A sealed value that does not open under this tenant's keys (another tenant's value,
    a relabelled row, a shredded tenant, a master key no longer provided, or tampering)."""


def _derive(master: bytes, salt: bytes, info: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError:  # pragma: no cover - the test extra installs it
        raise MissingMasterKey(
            "tenant data keys need the cryptography package: pip install 'tenantware[data]'"
        ) from None

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(master)


class TenantKeys:
    """The keys of one tenant: seal with the current master version, open with any."""

    __slots__ = ("_aad", "_ciphers", "_lookup", "_master", "_salt", "current", "tenant")

    def __init__(self, tenant: str, salt: bytes, master: MasterKeys) -> None:
        self.tenant = tenant
        self.current = master.current
        self._salt = salt
        self._master = master
        self._aad = tenant.encode()
        self._ciphers: dict[int, AESGCM] = {}
        self._lookup = _derive(master.keys[self.current], salt, _LOOKUP_KEY_INFO + self._aad)

    def _cipher(self, version: int) -> AESGCM:
        cipher = self._ciphers.get(version)
        if cipher is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            master = self._master.keys.get(version)
            if master is None:
                raise Undecryptable(f"master key version {version} is not provided")
            key = _derive(master, self._salt, _DATA_KEY_INFO + self._aad)
            cipher = self._ciphers[version] = AESGCM(key)
        return cipher

    def seal(self, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and bound to this tenant."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._cipher(self.current).encrypt(nonce, plaintext, self._aad)
        return _HEADER.pack(_FORMAT, self.current) + nonce + sealed

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of a value sealed for this tenant; ``Undecryptable`` otherwise."""
        from cryptography.exceptions import InvalidTag

        if len(sealed) < _OVERHEAD:
            raise Undecryptable("not a sealed value")
        form, version = _HEADER.unpack_from(sealed)
        if form != _FORMAT:
            raise Undecryptable(f"unknown sealed format {form}")
        start = _HEADER.size
        nonce = sealed[start : start + _NONCE_BYTES]
        try:
            return self._cipher(version).decrypt(nonce, sealed[start + _NONCE_BYTES :], self._aad)
        except InvalidTag:
            raise Undecryptable("authentication failed") from None

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is under the current master key (else: re-seal it)."""
        return len(sealed) >= _HEADER.size and _HEADER.unpack_from(sealed)[1] == self.current

    def lookup_key(self, data: bytes) -> bytes:
        """A keyed digest of ``data`` for this tenant (cache keys): equal requests of one
        tenant meet, another tenant's digest of the same bytes differs, and the digest says
        nothing about the request to whoever reads the store."""
        return hmac.new(self._lookup, data, hashlib.sha256).digest()


class KeyRing:
    """Every tenant's keys, derived on first use and kept for the process.

    ``shred(tenant)`` destroys the tenant's salt: its keys cannot be derived again, by this
    process or any other, whatever master key is provided.
    """

    def __init__(self, provider: KeyProvider, store: TenantKeyStore) -> None:
        self.provider = provider
        self.store = store
        self._master: MasterKeys | None = None
        self._tenants: dict[str, TenantKeys] = {}
        self._lock = anyio.Lock()

    async def master_keys(self) -> MasterKeys:
        if self._master is None:
            self._master = await self.provider.master_keys()
        return self._master

    def cached(self, tenant: str) -> TenantKeys | None:
        """The tenant's keys if already derived (no await: the request path's fast case)."""
        return self._tenants.get(tenant)

    async def keys(self, tenant: str, *, create: bool = True) -> TenantKeys | None:
        """The tenant's keys; a new salt is made when it has none and ``create`` is set
        (``None`` then means shredded or never keyed)."""
        found = self._tenants.get(tenant)
        if found is not None:
            return found
        async with self._lock:
            found = self._tenants.get(tenant)
            if found is not None:
                return found
            salt = await self.store.get_salt(tenant)
            if salt is None and not create:
                return None  # never keyed (or shredded): no master key needed to say so
            master = await self.master_keys()
            if salt is None:
                salt = await self.store.create_salt(tenant, os.urandom(32))
            found = self._tenants[tenant] = TenantKeys(tenant, salt, master)
            return found

    async def shred(self, tenant: str) -> bool:
        """Destroy the tenant's key material; whether it had any."""
        self._tenants.pop(tenant, None)
        return await self.store.destroy_salt(tenant)

    def derived(self) -> list[str]:
        """Tenants whose keys this process holds."""
        return list(self._tenants)

    def forget(self, tenant: str | None = None) -> None:
        """Drop derived keys from this process (one tenant, or all: after a rotation or
        another process's shredding), so they are derived again from the store."""
        if tenant is None:
            self._tenants.clear()
            self._master = None
        else:
            self._tenants.pop(tenant, None)
