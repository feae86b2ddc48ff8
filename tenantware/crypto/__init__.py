"""Per-tenant encryption: master keys from a provider, one data key per tenant (HKDF), and
AES-GCM with the tenant id as associated data.

- ``providers``: where master keys come from (``KeyProvider``; environment and file ones);
- ``material``: the per-tenant random salt each data key is derived with (``TenantKeyStore``),
  whose destruction makes the tenant's ciphertext unreadable (crypto-shredding);
- ``keyring``: derives and caches each tenant's keys, seals and opens its data.

``cryptography`` (the ``data`` extra) is imported when a key is first derived.
"""

from __future__ import annotations

from tenantware.crypto.keyring import KeyRing, TenantKeys, Undecryptable
from tenantware.crypto.material import MemoryTenantKeyStore, TenantKeyStore
from tenantware.crypto.providers import (
    EnvKeyProvider,
    FileKeyProvider,
    KeyProvider,
    MasterKeys,
    MissingMasterKey,
    StaticKeyProvider,
    key_provider,
    parse_master_keys,
)

__all__ = [
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "KeyRing",
    "MasterKeys",
    "MemoryTenantKeyStore",
    "MissingMasterKey",
    "StaticKeyProvider",
    "TenantKeyStore",
    "TenantKeys",
    "Undecryptable",
    "key_provider",
    "parse_master_keys",
]
