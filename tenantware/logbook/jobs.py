"""The jobs over the log store: the retention purge and the master key rotation.

Both go tenant by tenant (each call bound to one tenant, as row-level security wants) and
in bounded batches. Rotation re-seals rows sealed under an older master key version with the
current one; it is resumable by construction: a row is re-sealed in place, so a rerun after
an interruption finds only the rows still to do. Reading a tenant's logs re-seals the rows it
reads (``tenantdata.TenantData.read_logs``): rotation also happens lazily, as data is used.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec

from tenantware.crypto import KeyRing, Undecryptable
from tenantware.logbook.record import LogRow
from tenantware.logbook.store import LogStore

__all__ = ["purge_expired", "rotate"]


async def purge_expired(store: LogStore, tenants: Iterable[str], now: float | None = None) -> int:
    """Delete every row past its retention for these tenants; how many."""
    at = time.time() if now is None else now
    return sum([await store.purge_expired(tenant, at) for tenant in tenants])


async def rotate(
    store: LogStore, keyring: KeyRing, tenants: Iterable[str], *, batch: int = 500
) -> int:
    """Re-seal these tenants' rows under the current master key; how many were re-sealed."""
    done = 0
    for tenant in tenants:
        keys = await keyring.keys(tenant, create=False)
        if keys is None:
            continue  # never keyed, or shredded: nothing readable to re-seal
        while True:
            rows = await store.stale(tenant, keys.current, batch)
            if not rows:
                break
            resealed: list[LogRow] = []
            for row in rows:
                try:
                    plain = keys.open(row.sealed)
                except Undecryptable:
                    continue  # its master key version is no longer provided
                resealed.append(
                    msgspec.structs.replace(row, sealed=keys.seal(plain), key_version=keys.current)
                )
            if not resealed:
                break  # only rows no key opens are left
            await store.reseal(resealed)
            done += len(resealed)
    return done
