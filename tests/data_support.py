"""Builders of the data segregation tests: master keys, tenants that opted in."""

from __future__ import annotations

import base64
import os
from typing import Any

from tenantware import KeyHasher
from tenantware.crypto import MasterKeys

#: acme's key is the one ``tests.metering_support.scope_for`` sends.
KEYS = {"acme": "sk-test-acme", "globex": "sk-data-globex", "plain": "sk-data-plain"}
MASTER_ENV = "TENANTWARE_TEST_MASTER_KEY"


def new_master(*versions: int) -> MasterKeys:
    return MasterKeys({version: os.urandom(32) for version in versions or (1,)})


def master_text(keys: MasterKeys) -> str:
    return ",".join(f"{v}:{base64.b64encode(k).decode()}" for v, k in sorted(keys.keys.items()))


def data_tenants(**data: Any) -> list[dict[str, Any]]:
    """acme and globex opted in with ``data`` (default: cache every model); plain did not."""
    hasher = KeyHasher()
    policy = data or {"cache_models": ["*"]}
    return [
        {
            "id": tenant,
            "tier": "enterprise",
            "keys": [{"id": f"{tenant}-1", "hash": hasher.hash(key)}],
            **({"data": policy} if tenant != "plain" else {}),
        }
        for tenant, key in KEYS.items()
    ]


ADMIN = "sk-data-admin"


def data_config(url: str = "http://upstream.test/v1", **data: Any) -> Any:
    """acme, globex (opted in with ``data``) and plain, an admin key, the test master key."""
    from tests.support import make_config

    return make_config(
        url,
        tenants=data_tenants(**data),
        data={"master_key_env": MASTER_ENV},
        breaker={"max_attempts": 1},
        gateway={"admin_keys": [{"id": "ops", "hash": KeyHasher().hash(ADMIN)}]},
    )
