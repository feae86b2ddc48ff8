"""The tenant-scoped response cache through the whole gateway (memory store, fake upstream)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantware import Gateway, HttpxUpstreamClient
from tenantware.cache import MemoryCacheStore, cache_key, canonical_request
from tenantware.context import Outcome
from tenantware.crypto import KeyRing, MemoryTenantKeyStore, StaticKeyProvider
from tenantware.logbook import MemoryLogStore
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.data_support import KEYS, MASTER_ENV, data_tenants, master_text, new_master
from tests.metering_support import call_streaming, records_of, wait_for
from tests.support import CHAT, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MASTER_ENV, master_text(new_master(1)))


def _config(url: str = "http://upstream.test/v1", **data: Any) -> Any:
    return make_config(
        url,
        tenants=data_tenants(**data),
        data={"master_key_env": MASTER_ENV},
        breaker={"max_attempts": 1},
    )


async def _chat(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post("/v1/chat/completions", json=body, headers=headers)


@pytest.mark.usefixtures("master")
async def test_second_identical_request_is_served_from_cache_and_metered_as_cached() -> None:
    gateway, fake = in_process_gateway(config=_config())
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        first = await _chat(client, CHAT)
        second = await _chat(client, CHAT)
        records = await records_of(gateway)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-tenantware-cache"] == "miss"
    assert second.headers["x-tenantware-cache"] == "hit"
    assert second.json() == first.json()
    assert fake.stats.requests == 1
    outcomes = sorted(r.outcome for r in records)
    assert outcomes == [Outcome.CACHED, Outcome.OK]
    cached = next(r for r in records if r.outcome == Outcome.CACHED)
    assert cached.cost_nanousd == cached.charged_nanousd == 0
    assert cached.input_tokens == cached.output_tokens == 0
    assert cached.upstream == "cache"


@pytest.mark.usefixtures("master")
async def test_another_tenant_with_the_same_request_is_never_served_the_first_ones_answer() -> None:
    gateway, fake = in_process_gateway(config=_config())
    app = gateway.asgi_app()
    async with gateway.running():
        async with client_for(app, KEYS["acme"]) as acme:
            first = await _chat(acme, CHAT)
            assert (await _chat(acme, CHAT)).headers["x-tenantware-cache"] == "hit"
        async with client_for(app, KEYS["globex"]) as globex:
            other = await _chat(globex, CHAT)
    assert other.headers["x-tenantware-cache"] == "miss"
    assert other.json()["id"] != first.json()["id"]
    assert fake.stats.requests == 2


@pytest.mark.usefixtures("master")
async def test_no_cache_bypasses_the_lookup_and_no_store_skips_the_cache() -> None:
    gateway, fake = in_process_gateway(config=_config())
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        await _chat(client, CHAT)
        fresh = await _chat(client, CHAT, **{"cache-control": "no-cache"})
        kept = await _chat(client, CHAT)
        other = {**CHAT, "temperature": 0.5}
        unkept = await _chat(client, other, **{"cache-control": "no-store"})
        still_miss = await _chat(client, other)
    assert fresh.headers["x-tenantware-cache"] == "bypass"
    assert kept.headers["x-tenantware-cache"] == "hit"
    assert kept.json()["id"] == fresh.json()["id"]  # the fresh answer replaced the entry
    assert unkept.headers["x-tenantware-cache"] == "bypass"
    assert still_miss.headers["x-tenantware-cache"] == "miss"
    assert fake.stats.requests == 4


@pytest.mark.usefixtures("master")
async def test_a_tenant_or_model_that_did_not_opt_in_is_passed_through_untouched() -> None:
    gateway, fake = in_process_gateway(config=_config(cache_models=["gpt-4.1"]))
    async with gateway.running():
        async with client_for(gateway.asgi_app(), KEYS["plain"]) as plain:
            answers = [await _chat(plain, CHAT) for _ in range(2)]
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as acme:
            other_model = {**CHAT, "model": "deepseek-v3.2"}
            answers += [await _chat(acme, other_model) for _ in range(2)]
    assert all("x-tenantware-cache" not in a.headers for a in answers)
    assert fake.stats.requests == 4


@pytest.mark.usefixtures("master")
async def test_stream_is_replayed_as_the_same_server_sent_events() -> None:
    gateway, fake = in_process_gateway(config=_config())
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        first = await _chat(client, body)
        second = await _chat(client, body)
        plain = await _chat(client, {**CHAT, "stream": False})
    assert second.headers["x-tenantware-cache"] == "hit"
    assert second.headers["content-type"].startswith("text/event-stream")
    assert second.text == first.text
    assert second.text.rstrip().endswith("data: [DONE]")
    assert plain.headers["x-tenantware-cache"] == "miss"  # a stream is not a JSON answer
    assert fake.stats.requests == 2


@pytest.mark.usefixtures("master")
async def test_failed_or_cut_answers_are_not_cached() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=20, fail_next=[500]))
    body = {**CHAT, "stream": True}
    with serve_in_thread(fake) as url:
        gateway = Gateway(_config(url + "/v1"))
        app = gateway.asgi_app()
        async with gateway.running(), client_for(app, KEYS["acme"]) as client:
            failed = await _chat(client, CHAT)
            assert failed.status_code >= 500
            fake.config.chunk_delay_s = 0.05
            parts = await call_streaming(app, body, disconnect_after=2)
            assert parts
            await wait_for(lambda: fake.stats.in_flight == 0)
            fake.config.chunk_delay_s = 0.0
            after = [await _chat(client, CHAT), await _chat(client, body)]
            records = await records_of(gateway)
    assert Outcome.CLIENT_DISCONNECTED in {r.outcome for r in records}
    assert [a.headers["x-tenantware-cache"] for a in after] == ["miss", "miss"]


@pytest.mark.usefixtures("master")
async def test_equivalent_spellings_of_a_request_meet_in_the_cache() -> None:
    gateway, fake = in_process_gateway(config=_config())
    reordered = json.dumps({"messages": CHAT["messages"], "model": "gpt4", "user": "x"})
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        await _chat(client, CHAT)
        hit = await client.post(
            "/v1/chat/completions",
            content=reordered.encode(),
            headers={"content-type": "application/json"},
        )
    assert hit.headers["x-tenantware-cache"] == "hit"
    assert fake.stats.requests == 1


# -- proofs over request shapes -------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_requests = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gpt-4.1", "deepseek-v3.2"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"temperature": st.floats(0, 2), "max_tokens": st.integers(1, 50), "x": _json},
)
_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(request=_requests, first=_ids, second=_ids)
async def test_cache_keys_of_two_tenants_always_differ(
    request: dict[str, Any], first: str, second: str
) -> None:
    if first == second:
        return
    ring = KeyRing(StaticKeyProvider(new_master(1)), MemoryTenantKeyStore())
    canonical = canonical_request(
        "/v1/chat/completions", request["model"], json.dumps(request).encode()
    )
    assert canonical is not None
    a = cache_key(await ring.keys(first), canonical)  # type: ignore[arg-type]
    b = cache_key(await ring.keys(second), canonical)  # type: ignore[arg-type]
    assert a != b


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=_requests, stream=st.booleans())
@pytest.mark.usefixtures("master")
async def test_tenant_b_never_gets_the_answer_cached_for_tenant_a(
    request: dict[str, Any], stream: bool
) -> None:
    gateway, fake = in_process_gateway(config=_config())
    body = {**request, "stream": stream}
    app = gateway.asgi_app()
    async with gateway.running():
        async with client_for(app, KEYS["acme"]) as acme:
            for _ in range(2):
                await _chat(acme, body)
        async with client_for(app, KEYS["globex"]) as globex:
            answer = await _chat(globex, body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tenantware-cache"] == "miss"
    assert fake.stats.requests == 2
    assert isinstance(gateway.cache_store, MemoryCacheStore)


@pytest.mark.usefixtures("master")
async def test_replicas_sharing_a_redis_cache_serve_each_others_entries(
    redis_url: str, redis_prefix: str
) -> None:
    config = make_config(
        tenants=data_tenants(),
        data={"master_key_env": MASTER_ENV, "cache_url": redis_url},
        gateway={"redis_prefix": redis_prefix},
    )
    keys = MemoryLogStore()  # the replicas' shared key store (the ledger database)
    fake = FakeUpstream()
    one = Gateway(config, upstream_client=_client(fake), log_store=keys)
    two = Gateway(config, upstream_client=_client(fake), log_store=keys)
    async with one.running(), two.running():
        async with client_for(one.asgi_app(), KEYS["acme"]) as client:
            first = await _chat(client, CHAT)
        async with client_for(two.asgi_app(), KEYS["acme"]) as client:
            second = await _chat(client, CHAT)
        async with client_for(two.asgi_app(), KEYS["globex"]) as client:
            other = await _chat(client, CHAT)
    assert second.headers["x-tenantware-cache"] == "hit"
    assert second.json() == first.json()
    assert other.headers["x-tenantware-cache"] == "miss"
    assert fake.stats.requests == 2


def _client(fake: FakeUpstream) -> HttpxUpstreamClient:
    return HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))


@pytest.mark.usefixtures("master")
async def test_an_admin_switches_a_tenants_cache_on_at_run_time() -> None:
    from tests.data_support import ADMIN, data_config

    gateway, fake = in_process_gateway(config=data_config(cache_models=[]))
    app = gateway.asgi_app()
    async with gateway.running():
        async with client_for(app, KEYS["acme"]) as acme:
            before = await _chat(acme, CHAT)
        async with client_for(app, ADMIN) as admin:
            switched = await admin.patch(
                "/admin/tenants/acme", json={"data": {"cache_models": ["gpt-4.1"]}}
            )
            refused = await admin.patch(
                "/admin/tenants/acme", json={"data": {"cache_models": ["gpt-9"]}}
            )
        async with client_for(app, KEYS["acme"]) as acme:
            after = [await _chat(acme, CHAT) for _ in range(2)]
    assert "x-tenantware-cache" not in before.headers
    assert switched.status_code == 200, switched.text
    assert switched.json()["data"]["cache_models"] == ["gpt-4.1"]
    assert refused.status_code == 400
    assert [a.headers["x-tenantware-cache"] for a in after] == ["miss", "hit"]
    assert fake.stats.requests == 2


@pytest.mark.usefixtures("master")
async def test_anthropic_messages_are_cached_apart_from_chat_completions() -> None:
    gateway, fake = in_process_gateway(config=_config())
    body = {**CHAT, "max_tokens": 16}
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        chat = await _chat(client, body)
        messages = [await client.post("/v1/messages", json=body) for _ in range(2)]
    assert chat.headers["x-tenantware-cache"] == "miss"
    assert [m.headers["x-tenantware-cache"] for m in messages] == ["miss", "hit"]
    assert messages[1].json() == messages[0].json()
    assert messages[1].json()["type"] == "message"
    assert fake.stats.requests == 2


@pytest.mark.usefixtures("master")
async def test_an_unreachable_cache_store_serves_every_request_without_the_cache() -> None:
    config = make_config(
        tenants=data_tenants(),
        data={"master_key_env": MASTER_ENV, "cache_url": "redis://127.0.0.1:1/0"},
        gateway={"redis_timeout_s": 0.2},
    )
    gateway, fake = in_process_gateway(config=config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        answers = [await _chat(client, CHAT) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["x-tenantware-cache"] for a in answers] == ["miss", "miss"]
    assert fake.stats.requests == 2
