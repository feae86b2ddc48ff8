"""Per-tenant keys: HKDF data keys, AES-GCM bound to the tenant id, rotation, shredding."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tenantware.context import Outcome, Usage
from tenantware.crypto import (
    EnvKeyProvider,
    FileKeyProvider,
    KeyRing,
    MasterKeys,
    MemoryTenantKeyStore,
    MissingMasterKey,
    StaticKeyProvider,
    TenantKeys,
    Undecryptable,
    parse_master_keys,
)
from tenantware.metering.billing import billable_usage
from tests.data_support import master_text, new_master

pytestmark = pytest.mark.anyio


async def _keys(ring: KeyRing, tenant: str) -> TenantKeys:
    keys = await ring.keys(tenant)
    assert keys is not None
    return keys


async def test_a_ciphertext_of_a_does_not_open_under_b_nor_relabelled_as_b() -> None:
    store = MemoryTenantKeyStore()
    ring = KeyRing(StaticKeyProvider(new_master(1)), store)
    a, b = await _keys(ring, "a"), await _keys(ring, "b")
    sealed = a.seal(b"the prompt of a")
    assert a.open(sealed) == b"the prompt of a"
    with pytest.raises(Undecryptable):
        b.open(sealed)
    # Relabelled: b's salt under a's id (the row moved, or the salts were swapped) fails too,
    # since the tenant id is bound as associated data and into the derived key.
    relabelled = TenantKeys("b", store.salts["a"], await ring.master_keys())
    with pytest.raises(Undecryptable):
        relabelled.open(sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(Undecryptable):
        a.open(tampered)


async def test_shredding_makes_the_tenants_ciphertext_unreadable_with_the_master_key() -> None:
    master = new_master(1)
    store = MemoryTenantKeyStore()
    ring = KeyRing(StaticKeyProvider(master), store)
    sealed = (await _keys(ring, "a")).seal(b"secret")
    assert await ring.shred("a")
    # Another process with the same master key and the same store: no key to derive.
    other = KeyRing(StaticKeyProvider(master), store)
    assert await other.keys("a", create=False) is None
    recreated = await _keys(other, "a")  # a new tenant with the same id: a new salt
    with pytest.raises(Undecryptable):
        recreated.open(sealed)


async def test_rotation_opens_old_values_and_seals_new_ones_under_the_current_master() -> None:
    store = MemoryTenantKeyStore()
    old = new_master(1)
    sealed = (await _keys(KeyRing(StaticKeyProvider(old), store), "a")).seal(b"before")
    rotated = MasterKeys({**old.keys, 2: os.urandom(32)})
    keys = await _keys(KeyRing(StaticKeyProvider(rotated), store), "a")
    assert not keys.is_current(sealed)
    assert keys.open(sealed) == b"before"
    resealed = keys.seal(b"before")
    assert keys.is_current(resealed)
    # Once version 1 is no longer provided, only re-sealed values open.
    retired = await _keys(KeyRing(StaticKeyProvider(MasterKeys({2: rotated.keys[2]})), store), "a")
    assert retired.open(resealed) == b"before"
    with pytest.raises(Undecryptable):
        retired.open(sealed)


async def test_two_processes_keying_one_tenant_at_once_agree_on_its_salt() -> None:
    store = MemoryTenantKeyStore()
    master = new_master(1)
    first = await _keys(KeyRing(StaticKeyProvider(master), store), "a")
    second = await _keys(KeyRing(StaticKeyProvider(master), store), "a")
    assert second.open(first.seal(b"x")) == b"x"
    assert first.lookup_key(b"q") == second.lookup_key(b"q")


async def test_providers_read_versions_and_refuse_short_or_missing_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = new_master(1, 3)
    monkeypatch.setenv("TW_TEST_KEYS", master_text(keys))
    assert (await EnvKeyProvider("TW_TEST_KEYS").master_keys()).keys == keys.keys
    path = tmp_path / "keys"
    path.write_text("# rotated yearly\n" + master_text(keys).replace(",", "\n") + "\n")
    loaded = await FileKeyProvider(path).master_keys()
    assert loaded.current == 3
    assert loaded.keys == keys.keys
    assert repr(loaded) == "MasterKeys(versions=[1, 3])"
    with pytest.raises(MissingMasterKey, match="at least 32"):
        parse_master_keys(base64.b64encode(b"short").decode(), source="x")
    monkeypatch.delenv("TW_TEST_KEYS")
    with pytest.raises(MissingMasterKey, match=r"\$TW_TEST_KEYS is not set"):
        await EnvKeyProvider("TW_TEST_KEYS").master_keys()
    with pytest.raises(MissingMasterKey) as error:
        parse_master_keys("1:" + "!" * 44, source="x")
    assert "!!!!" not in str(error.value)


def test_billing_rule_a_cached_answer_is_not_billed() -> None:
    usage = Usage(input_tokens=100, output_tokens=50)
    assert billable_usage(Outcome.CACHED, usage) is None
    assert billable_usage(Outcome.OK, usage) is usage
