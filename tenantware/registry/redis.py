"""The shared registry: every tenant as one JSON document in Redis, one version for all.

Keys (one hash tag, so every script runs on Redis Cluster too):

- ``{prefix}tw:{registry}:tenants``: hash, tenant id -> the tenant as JSON (keys as hashes);
- ``{prefix}tw:{registry}:versions``: hash, tenant id -> version of its last change;
- ``{prefix}tw:{registry}:version``: the registry version, bumped by every change;
- ``{prefix}tw:{registry}:audit``: list of audit entries (JSON), oldest first, capped;
- ``{prefix}tw:{registry}:admins`` / ``:admin_versions``: admin keys issued through the API;
- ``{prefix}tw:{registry}:rules`` / ``:rule_versions``: rules changed through the API
  (``registry.rules``: ``migration``, ``alerts``), one JSON document each.

A write is one Lua script: check the record's version (``If-Match``), bump the registry
version, write the record and its audit entry, and publish the new version on
``{prefix}tw:registry:changes``. Readers copy the whole registry (``load``) when they learn
of a newer version, by that message or by their periodic ``version()`` check.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

import msgspec

from tenantware.backends.redis_support import connect_redis, redis_errors
from tenantware.config import AdminKey, Tenant
from tenantware.registry.rules import RuleDocument, RuleName
from tenantware.registry.store import AuditEntry, RegistryState, TenantRecord, VersionMismatch

__all__ = ["RedisRegistryStore"]

#: Audit entries kept in Redis (the oldest are trimmed).
AUDIT_KEPT: Final = 100_000

_PUT: Final = """
local current = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= current then return {0, current} end
if ARGV[3] == '' and current == 0 then return {0, 0} end
local version = redis.call('INCR', KEYS[3])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[1], version)
end
redis.call('RPUSH', KEYS[4], '{"version":' .. version .. ',' .. string.sub(ARGV[4], 2))
redis.call('LTRIM', KEYS[4], -tonumber(ARGV[6]), -1)
redis.call('PUBLISH', ARGV[5], version)
return {1, version}
"""

_SEED: Final = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local version = redis.call('INCR', KEYS[3])
local last_tenant = 2 + 2 * tonumber(ARGV[2])
for i = 3, last_tenant, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], version)
end
for i = last_tenant + 1, #ARGV, 2 do
  redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[6], ARGV[i], version)
end
redis.call('PUBLISH', ARGV[1], version)
return version
"""

_LOAD: Final = """
return {redis.call('GET', KEYS[3]) or '', redis.call('HGETALL', KEYS[1]),
        redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[5]),
        redis.call('HGETALL', KEYS[7]), redis.call('HGETALL', KEYS[8])}
"""

_encode = msgspec.json.Encoder().encode
_decode_tenant = msgspec.json.Decoder(Tenant).decode
_decode_audit = msgspec.json.Decoder(AuditEntry).decode
_decode_admin = msgspec.json.Decoder(AdminKey).decode


class RedisRegistryStore:
    """``RedisRegistryStore("redis://127.0.0.1:6379/0", prefix="app1:")``.

    It has its own client: registry calls are rare and may be larger and slower than the
    per-request scripts, so they get a longer timeout than the hot path's.
    """

    shared = True

    def __init__(self, url: str, *, prefix: str = "", timeout_s: float = 2.0) -> None:
        #: Names this store's connections in ``CLIENT LIST`` (operators, and tests that cut
        #: one replica's subscription).
        self.client_name = f"tw-registry-{secrets.token_hex(4)}"
        self._redis = connect_redis(url, timeout_s=timeout_s, client_name=self.client_name)
        base = f"{prefix}tw:{{registry}}"
        self._keys = [
            f"{base}:tenants",
            f"{base}:versions",
            f"{base}:version",
            f"{base}:audit",
            f"{base}:admins",
            f"{base}:admin_versions",
            f"{base}:rules",
            f"{base}:rule_versions",
        ]
        #: What a write of an admin key touches (the same script, other hashes).
        self._admin_keys = [self._keys[4], self._keys[5], self._keys[2], self._keys[3]]
        #: What a write of a rules document touches.
        self._rule_keys = [self._keys[6], self._keys[7], self._keys[2], self._keys[3]]
        #: The pub/sub channel every write announces its version on.
        self.channel = f"{prefix}tw:registry:changes"
        #: Records decoded by the last ``load``: a tenant whose version did not move is not
        #: decoded again (a change reloads the registry, but decodes only what changed).
        self._decoded: dict[bytes, TenantRecord] = {}
        self._decoded_at = 0
        self._put = self._redis.register_script(_PUT)
        self._seed = self._redis.register_script(_SEED)
        self._load = self._redis.register_script(_LOAD)

    async def load(self) -> RegistryState:
        with redis_errors():
            raw_version, tenants, versions, admins, rules, rule_versions = await self._load(
                keys=self._keys
            )
        documents = _pairs(tenants)
        numbers = _pairs(versions)
        registry_version = int(raw_version or 0)
        if registry_version < self._decoded_at:
            self._decoded = {}  # the registry started over (emptied, seeded): versions repeat
        self._decoded_at = registry_version
        decoded: dict[bytes, TenantRecord] = {}
        for key, document in documents.items():
            version = int(numbers.get(key, b"0"))
            record = self._decoded.get(key)
            if record is None or record.version != version:
                record = TenantRecord(version=version, tenant=_decode_tenant(document))
            decoded[key] = record
        self._decoded = decoded
        records = {key.decode(): record for key, record in decoded.items()}
        return RegistryState(
            version=registry_version,
            records=records,
            admins={k.decode(): _decode_admin(v) for k, v in _pairs(admins).items()},
            rules=_rule_documents(rules, rule_versions),
            initialized=bool(raw_version),
        )

    async def version(self) -> int:
        with redis_errors():
            raw = await self._redis.get(self._keys[2])
        return int(raw or 0)

    async def get(self, tenant_id: str) -> TenantRecord | None:
        with redis_errors():
            document, version = await self._pipeline_get(tenant_id)
        if document is None:
            return None
        return TenantRecord(version=int(version or 0), tenant=_decode_tenant(document))

    async def _pipeline_get(self, tenant_id: str) -> tuple[Any, Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self._keys[0], tenant_id)
            pipe.hget(self._keys[1], tenant_id)
            document, version = await pipe.execute()
        return document, version

    async def _write(
        self,
        tenant_id: str,
        document: bytes,
        expect: int | None,
        audit: AuditEntry,
        keys: list[str] | None = None,
    ) -> int:
        args: list[str | bytes] = [
            tenant_id,
            "" if expect is None else str(expect),
            document,
            _encode(audit),
            self.channel,
            str(AUDIT_KEPT),
        ]
        with redis_errors():
            done, version = await self._put(keys=keys or self._keys[:4], args=args)
        if not done:
            raise VersionMismatch(int(version))
        return int(version)

    async def put(self, tenant: Tenant, *, expect: int | None, audit: AuditEntry) -> int:
        return await self._write(tenant.id, _encode(tenant), expect, audit)

    async def delete(self, tenant_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        return await self._write(tenant_id, b"", expect, audit)

    async def put_admin(self, key: AdminKey, *, expect: int | None, audit: AuditEntry) -> int:
        return await self._write(key.id, _encode(key), expect, audit, self._admin_keys)

    async def delete_admin(self, key_id: str, *, expect: int | None, audit: AuditEntry) -> int:
        return await self._write(key_id, b"", expect, audit, self._admin_keys)

    async def get_rules(self, name: RuleName) -> RuleDocument | None:
        with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._keys[6], name)
                pipe.hget(self._keys[7], name)
                document, version = await pipe.execute()
        if document is None:
            return None
        return RuleDocument(version=int(version or 0), document=document)

    async def put_rules(
        self, name: RuleName, document: bytes | None, *, expect: int | None, audit: AuditEntry
    ) -> int:
        return await self._write(name, document or b"", expect, audit, self._rule_keys)

    async def seed(self, tenants: list[Tenant], rules: Mapping[str, bytes] | None = None) -> bool:
        args: list[Any] = [self.channel, str(len(tenants))]
        for tenant in tenants:
            args += [tenant.id, _encode(tenant)]
        for name, document in (rules or {}).items():
            args += [name, document]
        with redis_errors():
            version = await self._seed(keys=[*self._keys[:4], *self._keys[6:8]], args=args)
        return bool(version)

    async def remember(self, key: str, value: bytes, ttl_s: float) -> bytes | None:
        name = self._keys[0].rsplit(":", 1)[0] + ":idempotency:" + key
        with redis_errors():
            kept = await self._redis.set(
                name, value, nx=True, px=max(1, int(ttl_s * 1000)), get=True
            )
        return kept if isinstance(kept, bytes) else None

    async def audit(self, *, tenant: str | None, limit: int) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        end = -1
        page = max(100, limit)
        with redis_errors():
            while len(found) < limit:
                raw = await self._redis.lrange(self._keys[3], end - page + 1, end)
                if not raw:
                    break
                for item in reversed(raw):
                    entry = _decode_audit(item)
                    if tenant is None or entry.tenant == tenant:
                        found.append(entry)
                        if len(found) >= limit:
                            break
                if len(raw) < page:
                    break
                end -= page
        return found

    async def changes(self) -> AsyncGenerator[int, None]:
        """The version once subscribed (what changed while not subscribed is not missed),
        then each version writers publish; raises ``StoreUnavailable`` when the subscription
        is lost (the caller subscribes again)."""
        with redis_errors():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                yield await self.version()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        try:
                            yield int(message["data"])
                        except ValueError:
                            continue
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        await self._redis.aclose()


def _rule_documents(documents: list[bytes], versions: list[bytes]) -> dict[str, RuleDocument]:
    numbers = _pairs(versions)
    return {
        name.decode(): RuleDocument(version=int(numbers.get(name, b"0")), document=document)
        for name, document in _pairs(documents).items()
    }


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
