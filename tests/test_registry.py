"""The registry stores (memory and Redis, one contract) and live changes across replicas."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import anyio
import pytest
import redis as redis_sync

from tenantware import Gateway, GatewayConfig, Tenant
from tenantware.config import AdminKey, ApiKey
from tenantware.keys import KeyHasher
from tenantware.metrics import REGISTRY
from tenantware.registry import AuditEntry, RegistryStore, VersionMismatch, open_registry
from tenantware.registry.memory import MemoryRegistryStore
from tenantware.registry.redis import RedisRegistryStore
from tenantware.registry.sync import RegistrySync
from tenantware.state import LiveConfig
from tests.servers import ServiceUnavailable, throwaway_redis
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio

ADMIN = "sk-test-admin"


def _audit(tenant: str, action: Any = "tenant.update") -> AuditEntry:
    return AuditEntry(at=time.time(), actor="test", action=action, tenant=tenant, before_version=0)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RegistryStore]:
    if request.param == "memory":
        yield MemoryRegistryStore()
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    redis_store = open_registry(url, prefix=prefix)
    try:
        yield redis_store
    finally:
        await redis_store.aclose()


async def test_store_contract(store: RegistryStore) -> None:
    empty = await store.load()
    assert not empty.initialized
    assert empty.version == 0
    assert await store.seed([Tenant(id="a"), Tenant(id="b", tier="pro")])
    assert not await store.seed([Tenant(id="c")]), "a second seed must not overwrite"
    state = await store.load()
    assert sorted(state.records) == ["a", "b"]
    seeded = state.version
    assert await store.version() == seeded

    record = await store.get("b")
    assert record is not None
    assert record.tenant.tier == "pro"
    v2 = await store.put(
        Tenant(id="b", tier="enterprise"), expect=record.version, audit=_audit("b")
    )
    assert v2 > seeded
    with pytest.raises(VersionMismatch) as stale:
        await store.put(Tenant(id="b"), expect=record.version, audit=_audit("b"))
    assert stale.value.current == v2
    with pytest.raises(VersionMismatch):
        await store.put(Tenant(id="a"), expect=0, audit=_audit("a", "tenant.create"))
    v3 = await store.put(Tenant(id="c"), expect=0, audit=_audit("c", "tenant.create"))
    v4 = await store.delete("a", expect=None, audit=_audit("a", "tenant.delete"))
    with pytest.raises(VersionMismatch) as missing:
        await store.delete("a", expect=None, audit=_audit("a", "tenant.delete"))
    assert missing.value.current == 0
    state = await store.load()
    assert sorted(state.records) == ["b", "c"]
    assert state.records["b"].version == v2
    assert state.records["c"].version == v3
    assert state.version == v4 == await store.version()

    trail = await store.audit(tenant=None, limit=10)
    # One entry per successful change, newest first; none for the refused ones.
    assert [(e.action, e.tenant, e.version) for e in trail] == [
        ("tenant.delete", "a", v4),
        ("tenant.create", "c", v3),
        ("tenant.update", "b", v2),
    ]
    assert [e.tenant for e in await store.audit(tenant="c", limit=10)] == ["c"]

    admin_key = AdminKey(id="ops2", hash=KeyHasher().hash("sk-ops2"), role="read-only")
    v5 = await store.put_admin(admin_key, expect=0, audit=_audit("", "admin_key.issue"))
    assert (await store.load()).admins == {"ops2": admin_key}
    with pytest.raises(VersionMismatch):
        await store.put_admin(admin_key, expect=0, audit=_audit("", "admin_key.issue"))
    v6 = await store.delete_admin("ops2", expect=None, audit=_audit("", "admin_key.revoke"))
    assert v6 > v5 > v4
    assert (await store.load()).admins == {}
    assert [e.action for e in await store.audit(tenant="", limit=5)] == [
        "admin_key.revoke",
        "admin_key.issue",
    ]

    assert await store.remember("k", b"one", 60) is None
    assert await store.remember("k", b"two", 60) == b"one"


def shared_config(redis_url: str, prefix: str, **gateway: Any) -> GatewayConfig:
    hasher = KeyHasher()
    settings = {
        "registry_url": redis_url,
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "admin_keys": [{"id": "ops", "hash": hasher.hash(ADMIN)}],
        **gateway,
    }
    return make_config(gateway=settings)


@contextlib.asynccontextmanager
async def replicas(config: GatewayConfig, count: int = 2) -> AsyncIterator[list[Gateway]]:
    gateways = [in_process_gateway(config=config)[0] for _ in range(count)]
    async with contextlib.AsyncExitStack() as stack:
        for gateway in gateways:
            await stack.enter_async_context(gateway.running())
        yield gateways


async def until(check: Any, *, limit_s: float = 10.0, poll_s: float = 0.005) -> int:
    """Poll ``check()`` until true, bounded in time and count; the number of polls."""
    deadline = time.monotonic() + limit_s
    for polls in range(1, 1 + int(limit_s / poll_s)):
        if await check():
            return polls
        if time.monotonic() > deadline:
            break
        await anyio.sleep(poll_s)
    raise AssertionError("never converged")


async def test_a_key_revoked_on_one_replica_is_refused_by_the_other(
    redis_url: str, redis_prefix: str
) -> None:
    # A version check this slow cannot be what converges: the pub/sub message must.
    config = shared_config(redis_url, redis_prefix, registry_check_s=60)
    async with replicas(config) as (one, two):
        assert two.live.current.registry_version == one.live.current.registry_version > 0
        async with (
            client_for(one.asgi_app(), ADMIN) as admin,
            client_for(two.asgi_app(), KEYS["acme"]) as acme_on_two,
        ):
            assert (await acme_on_two.post("/v1/chat/completions", json=CHAT)).status_code == 200
            revoked = await admin.post("/admin/tenants/acme/keys/acme-1/revoke")
            assert revoked.status_code == 200, revoked.text

            async def refused() -> bool:
                response = await acme_on_two.post("/v1/chat/completions", json=CHAT)
                return response.status_code == 401

            await until(refused)
            assert two.live.current.registry_version == int(revoked.headers["etag"].strip('"'))


async def test_a_cut_subscription_is_taken_up_again(redis_url: str, redis_prefix: str) -> None:
    config = shared_config(redis_url, redis_prefix, registry_check_s=60)
    async with replicas(config) as (one, two):
        # Cut replica two's subscription (its pub/sub connection, by name), then change.
        name = two.registry_store.client_name  # type: ignore[attr-defined]
        with redis_sync.Redis.from_url(redis_url) as client:

            async def subscribed() -> bool:
                return any(i.get("name") == name for i in client.client_list(_type="pubsub"))

            await until(subscribed)
            for info in client.client_list(_type="pubsub"):
                if info.get("name") == name:
                    client.client_kill_filter(_id=info["id"])
        async with client_for(one.asgi_app(), ADMIN) as admin:
            patched = await admin.patch("/admin/tenants/hobby", json={"weight": 0.9})
            assert patched.status_code == 200
        target = int(patched.headers["etag"].strip('"'))

        async def applied() -> bool:
            return two.live.current.registry_version >= target

        # With a one-minute version check, only listening again (and reading the version
        # on subscribing) can bring the change this soon.
        await until(applied)
        view = two.live.current.registry.by_id("hobby")
        assert view is not None
        assert view.weight == 0.9
        assert not two.registry.stale, "a lost subscription is not an outage"


class DeafRedisRegistry(RedisRegistryStore):
    """A replica that never hears pub/sub: every message to it is lost."""

    async def changes(self) -> AsyncGenerator[int, None]:
        await anyio.sleep_forever()
        yield 0  # pragma: no cover


async def test_lost_messages_are_caught_by_the_version_check(
    redis_url: str, redis_prefix: str
) -> None:
    config = shared_config(redis_url, redis_prefix, registry_check_s=0.2)
    async with replicas(config) as (one, _):
        deaf, _ = in_process_gateway(config=config)
        deaf.registry_store = DeafRedisRegistry(redis_url, prefix=redis_prefix)
        deaf.registry = RegistrySync(deaf.live, deaf.registry_store, check_s=0.2)
        async with deaf.registry.running():
            try:
                async with client_for(one.asgi_app(), ADMIN) as admin:
                    revoked = await admin.post("/admin/tenants/acme/keys/acme-1/revoke")
                    assert revoked.status_code == 200
                target = int(revoked.headers["etag"].strip('"'))

                async def applied() -> bool:
                    return deaf.live.current.registry_version >= target

                await until(applied)
                gone = deaf.live.current.registry.by_key_hash(KeyHasher().hash(KEYS["acme"]))
                assert gone is None
            finally:
                await deaf.registry_store.aclose()
                await deaf.stores.aclose()


async def test_a_raised_limit_applies_at_once_and_keeps_the_counters(
    redis_url: str, redis_prefix: str
) -> None:
    config = shared_config(redis_url, redis_prefix)
    chat = {**CHAT, "max_tokens": 10}
    async with (
        replicas(config) as (one, two),
        client_for(one.asgi_app(), ADMIN) as admin,
        client_for(two.asgi_app(), KEYS["acme"]) as acme,
    ):

        async def set_limit(tokens: int) -> None:
            changed = await admin.patch(
                "/admin/tenants/acme", json={"limits": {"tokens_per_day": tokens}}
            )
            assert changed.status_code == 200, changed.text
            target = int(changed.headers["etag"].strip('"'))

            async def applied() -> bool:
                return two.live.current.registry_version >= target

            await until(applied)

        def used(response: Any) -> int:
            headers = response.headers
            limit = int(headers["x-ratelimit-limit-tokens"])
            return limit - int(headers["x-ratelimit-remaining-tokens"])

        await set_limit(40)
        first = await acme.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "40"
        spent = first.json()["usage"]["total_tokens"]
        assert (await acme.post("/v1/chat/completions", json=chat)).status_code == 429
        await set_limit(1000)
        after = await acme.post("/v1/chat/completions", json=chat)
        assert after.status_code == 200
        assert after.headers["x-ratelimit-limit-tokens"] == "1000"
        # The day's count goes on from the first request's tokens: nothing was reset.
        assert used(after) == used(first) + spent


@pytest.fixture
def private_redis() -> Iterator[Any]:
    try:
        with throwaway_redis() as server:
            yield server
    except ServiceUnavailable as exc:
        pytest.skip(f"no private Redis: {exc.reason}")


def _stale_metric() -> float:
    value = REGISTRY.get_sample_value("tenantware_registry_stale")
    return -1.0 if value is None else value


async def test_an_unreachable_registry_leaves_the_last_copy_serving(private_redis: Any) -> None:
    config = shared_config(private_redis.url, "", registry_check_s=0.1)
    gateway, _ = in_process_gateway(config=config)
    app = gateway.asgi_app()
    async with gateway.running(), client_for(app, KEYS["acme"]) as acme, client_for(app) as probe:
        assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await probe.get("/readyz")).json()["registry"]["status"] == "ok"
        private_redis.stop()

        async def stale() -> bool:
            return gateway.registry.stale

        await until(stale)
        assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200
        ready = await probe.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["registry"]["status"] == "stale"
        assert "redis://" not in ready.text
        assert _stale_metric() == 1
        async with client_for(app, ADMIN) as admin:
            down = await admin.post("/admin/tenants", json={"id": "later"})
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "registry_unavailable"

        private_redis.start()  # empty again: the replica seeds it from its file

        async def recovered() -> bool:
            return not gateway.registry.stale

        await until(recovered)
        assert _stale_metric() == 0
        assert (await acme.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_file_registry_changes_stay_in_the_process_and_reload_restores_the_file() -> None:
    hasher = KeyHasher()
    config = make_config(gateway={"admin_keys": [{"id": "ops", "hash": hasher.hash(ADMIN)}]})
    gateway, _ = in_process_gateway(config=config)
    assert not gateway.registry_store.shared
    async with gateway.running(), client_for(gateway.asgi_app(), ADMIN) as admin:
        assert (await admin.post("/admin/tenants", json={"id": "temp"})).status_code == 201
        assert gateway.live.current.registry.by_id("temp") is not None
        gateway.live.replace(config)  # the file reloaded: its tenants again
        assert gateway.live.current.registry.by_id("temp") is None
        assert (await admin.get("/admin/tenants/temp")).status_code == 404
        assert (await admin.get("/admin/tenants/acme")).status_code == 200


def test_tenants_in_the_registry_feed_every_layer() -> None:
    config = make_config(
        quota={"tenant_model_limits": {"hobby": {"gpt-4.1": {"requests_per_minute": 1}}}}
    )
    gateway, _ = in_process_gateway(config=config)
    seats = Tenant(
        id="seated",
        reserved_seats=3,
        markup_percent=Decimal("12.5"),
        keys=[ApiKey(id="s1", hash=KeyHasher().hash("sk-seated"))],
    )
    acme = gateway.live.file_config.tenants[0]
    snapshot = gateway.live.set_tenants([acme, seats], registry_version=7)
    assert snapshot.registry_version == 7
    assert snapshot.config.admission.tenant_reserved_seats == {"seated": 3}
    assert snapshot.config.metering.markup_percent == {"seated": Decimal("12.5")}
    entry = snapshot.registry.by_key_hash(KeyHasher().hash("sk-seated"))
    assert entry is not None
    assert entry.tenant.id == "seated"
    # hobby is gone from the registry: the file's settings naming it are dropped, not fatal.
    assert snapshot.config.quota.tenant_model_limits == {}
    assert snapshot.registry.by_id("hobby") is None


def test_a_table_built_before_a_file_reload_is_not_installed_over_it() -> None:
    live = LiveConfig(make_config())
    live.tenants_follow_file = False  # a shared registry
    pending = live.build_tenants([Tenant(id="solo")], registry_version=3)
    reloaded = make_config(gateway={"default_max_tokens": 77})
    live.replace(reloaded)
    assert live.install(pending) is None, "it would undo the reload"
    assert live.current.config.gateway.default_max_tokens == 77
    again = live.build_tenants([Tenant(id="solo")], registry_version=3)
    installed = live.install(again)
    assert installed is live.current
    assert [t.id for t in live.current.config.tenants] == ["solo"]
    assert live.current.config.gateway.default_max_tokens == 77
