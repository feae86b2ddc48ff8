"""Where master keys come from: a small protocol a KMS client can implement, and the two
providers that ship (an environment variable, a file).

A provider hands out every master key it knows, numbered: the highest number encrypts, the
others still decrypt what was written before a rotation. Master keys never leave the process
(never logged, never stored next to the data).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Final, Protocol

import msgspec

__all__ = [
    "EnvKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "MasterKeys",
    "MissingMasterKey",
    "StaticKeyProvider",
    "key_provider",
    "parse_master_keys",
]

#: Shortest master key accepted (AES-256 strength).
MIN_KEY_BYTES: Final = 32


class MissingMasterKey(RuntimeError):
    """No usable master key: the message says where it was looked for (never its value)."""


class MasterKeys(msgspec.Struct, frozen=True):
    """Numbered master keys; ``current`` (the highest) encrypts."""

    keys: dict[int, bytes]

    @property
    def current(self) -> int:
        return max(self.keys)

    def __repr__(self) -> str:  # never print key bytes
        return f"MasterKeys(versions={sorted(self.keys)})"


class KeyProvider(Protocol):
    """Hands out the master keys (a KMS implements this with its own client)."""

    async def master_keys(self) -> MasterKeys: ...


def parse_master_keys(text: str, *, source: str) -> MasterKeys:
    """``base64`` (version 1) or ``version:base64`` entries separated by commas or lines."""
    keys: dict[int, bytes] = {}
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        number, colon, encoded = entry.partition(":")
        if not colon:
            number, encoded = "1", entry
        if not number.strip().isdigit() or int(number) < 1:
            raise MissingMasterKey(f"{source}: a key version must be a positive integer")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise MissingMasterKey(f"{source}: key version {number} is not base64") from None
        if len(key) < MIN_KEY_BYTES:
            raise MissingMasterKey(
                f"{source}: key version {number} has {len(key)} bytes, at least "
                f"{MIN_KEY_BYTES} are needed (tenantware keys new-master)"
            )
        keys[int(number)] = key
    if not keys:
        raise MissingMasterKey(f"{source}: no master key")
    return MasterKeys(keys)


class StaticKeyProvider:
    """Master keys held by the embedding application."""

    def __init__(self, keys: MasterKeys) -> None:
        self._keys = keys

    async def master_keys(self) -> MasterKeys:
        return self._keys


class EnvKeyProvider:
    """Master keys from an environment variable (read at each load, so a restart with a new
    value rotates)."""

    def __init__(self, variable: str = "TENANTWARE_MASTER_KEY") -> None:
        self.variable = variable

    async def master_keys(self) -> MasterKeys:
        value = os.environ.get(self.variable)
        if not value:
            raise MissingMasterKey(f"${self.variable} is not set")
        return parse_master_keys(value, source=f"${self.variable}")


class FileKeyProvider:
    """Master keys from a file of ``version:base64`` lines (a mounted secret)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def master_keys(self) -> MasterKeys:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise MissingMasterKey(f"{self.path}: cannot read: {exc.strerror}") from None
        return parse_master_keys(text, source=str(self.path))


def key_provider(env: str, file: str | None) -> KeyProvider:
    """The provider the ``[data]`` settings name: the file when set, else the variable."""
    return FileKeyProvider(file) if file else EnvKeyProvider(env)
