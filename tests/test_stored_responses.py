"""Stored responses (``GET``/``DELETE /v1/responses/{id}``): relayed to the native upstream
that keeps them, only for the tenant whose request created them; the owner records in memory
and on real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import msgspec
import openai
import pytest

from tenantware import Gateway, parse_config
from tenantware.ownership import MemoryOwnerStore, Owner, OwnerStore
from tenantware.stores import open_stores
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import TOKEN_TEXT, FakeUpstream, FakeUpstreamConfig
from tests.support import KEYS, tenant_entries

# -- the owner store, memory and Redis --------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def owners(request: pytest.FixtureRequest) -> AsyncIterator[OwnerStore]:
    if request.param == "memory":
        yield MemoryOwnerStore()
        return
    url = request.getfixturevalue("redis_url")
    stores = open_stores(url, prefix=request.getfixturevalue("redis_prefix"), timeout_s=2.0)
    try:
        yield stores.owner_store()
    finally:
        await stores.aclose()


ACME = Owner(tenant="acme", upstream="native")
HOBBY = Owner(tenant="hobby", upstream="native")


@pytest.mark.anyio
async def test_first_claim_owns_the_id_until_forgotten(owners: OwnerStore) -> None:
    assert await owners.owner("resp_1") is None
    assert await owners.claim("resp_1", ACME, 60)
    assert await owners.claim("resp_1", ACME, 60)  # the same owner again: fine
    assert not await owners.claim("resp_1", HOBBY, 60)  # a reused id keeps its first owner
    assert await owners.owner("resp_1") == ACME
    await owners.forget("resp_1")
    assert await owners.owner("resp_1") is None
    assert await owners.claim("resp_1", HOBBY, 60)
    assert await owners.owner("resp_1") == HOBBY


@pytest.mark.anyio
async def test_claims_expire_after_their_ttl(owners: OwnerStore) -> None:
    assert await owners.claim("resp_short", ACME, 0.05)
    assert await owners.claim("resp_long", ACME, 60)
    with anyio.fail_after(10):
        while await owners.owner("resp_short") is not None:
            await anyio.sleep(0.02)
    assert await owners.owner("resp_long") == ACME


@pytest.mark.anyio
async def test_memory_store_drops_its_oldest_claims_past_its_bound() -> None:
    now = [0.0]
    owners = MemoryOwnerStore(max_entries=3, clock=lambda: now[0])
    for index in range(5):
        await owners.claim(f"resp_{index}", ACME, 60)
    assert [await owners.owner(f"resp_{i}") for i in range(5)] == [None, None, ACME, ACME, ACME]
    now[0] = 61.0
    await owners.claim("resp_new", HOBBY, 60)
    assert await owners.owner("resp_4") is None
    assert len(owners._owners) == 1


# -- through the gateway with the openai SDK --------------------------------------------------


def _config(upstream: str, *, native: bool, redis: tuple[str, str] | None) -> Gateway:
    data = {
        "tenants": tenant_entries(),
        "upstreams": [
            {
                "name": "native" if native else "chat-only",
                "base_url": upstream + "/v1",
                "models": ["gpt-4.1"],
                "responses": native,
            }
        ],
        "metering": {"ledger_url": "memory://", "request_log": False, "flush_interval_s": 0.02},
    }
    if redis is not None:
        data["gateway"] = {"redis_url": redis[0], "redis_prefix": redis[1]}
    return Gateway(parse_config(data))


@pytest.fixture(params=["memory", "redis"])
def native(request: pytest.FixtureRequest) -> Iterator[tuple[Gateway, str, FakeUpstream]]:
    redis = None
    if request.param == "redis":
        redis = (request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))
    fake = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(fake, startup_timeout_s=30) as upstream:
        gateway = _config(upstream, native=True, redis=redis)
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            yield gateway, url, fake


@pytest.fixture
def clients() -> Iterator[list[openai.OpenAI]]:
    made: list[openai.OpenAI] = []
    yield made
    for client in made:
        client.close()


def _client(made: list[openai.OpenAI], url: str, tenant: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=10)
    made.append(client)
    return client


def test_only_the_creating_tenant_reads_and_deletes_a_stored_response(
    native: tuple[Gateway, str, FakeUpstream], clients: list[openai.OpenAI]
) -> None:
    _gateway, url, fake = native
    acme, hobby = _client(clients, url, "acme"), _client(clients, url, "hobby")
    created = acme.responses.create(model="gpt-4.1", input="Hello there")
    assert created.id in fake.stored_responses

    fetched = acme.responses.retrieve(created.id)
    assert (fetched.id, fetched.output_text) == (created.id, TOKEN_TEXT * 5)
    assert fake.last_request is not None
    assert (fake.last_request.method, fake.last_request.path) == (
        "GET",
        f"/v1/responses/{created.id}",
    )
    assert list(acme.responses.input_items.list(created.id)) == []

    # Another tenant: the 404 of an unknown id (not a 403), and the upstream is never asked.
    asked = fake.stats.requests
    for attempt in (hobby.responses.retrieve, hobby.responses.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            attempt(created.id)
        assert caught.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as unknown:
        hobby.responses.retrieve("resp_never_made")
    assert unknown.value.message == caught.value.message.replace(created.id, "resp_never_made")
    assert fake.stats.requests == asked
    assert created.id in fake.stored_responses

    acme.responses.delete(created.id)
    assert created.id not in fake.stored_responses
    with pytest.raises(openai.NotFoundError):
        acme.responses.retrieve(created.id)
    assert fake.stats.requests == asked + 1  # the record went with it: no call for that 404


def test_a_streamed_response_is_owned_from_its_events(
    native: tuple[Gateway, str, FakeUpstream], clients: list[openai.OpenAI]
) -> None:
    _gateway, url, _fake = native
    acme, hobby = _client(clients, url, "acme"), _client(clients, url, "hobby")
    with acme.responses.stream(model="gpt-4.1", input="Hello there") as stream:
        final = stream.get_final_response()
    assert acme.responses.retrieve(final.id).output_text == TOKEN_TEXT * 5
    with pytest.raises(openai.NotFoundError):
        hobby.responses.retrieve(final.id)


def test_a_translated_response_is_not_stored_anywhere(clients: list[openai.OpenAI]) -> None:
    fake = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(fake, startup_timeout_s=30) as upstream:
        gateway = _config(upstream, native=False, redis=None)
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            acme = _client(clients, url, "acme")
            created = acme.responses.create(model="gpt-4.1", input="Hello there")
            asked = fake.stats.requests
            with pytest.raises(openai.NotFoundError) as caught:
                acme.responses.retrieve(created.id)
            assert "natively" in caught.value.message
            with pytest.raises(openai.NotFoundError):
                acme.responses.delete(created.id)
            assert fake.stats.requests == asked


def test_an_upstream_no_longer_native_is_a_400(
    native: tuple[Gateway, str, FakeUpstream], clients: list[openai.OpenAI]
) -> None:
    gateway, url, _fake = native
    acme = _client(clients, url, "acme")
    created = acme.responses.create(model="gpt-4.1", input="Hello there")
    config = gateway.config
    upstream = config.upstreams[0]
    gateway.live.replace(
        msgspec.structs.replace(
            config, upstreams=[msgspec.structs.replace(upstream, responses=False)]
        )
    )
    with pytest.raises(openai.BadRequestError) as caught:
        acme.responses.retrieve(created.id)
    assert caught.value.code == "response_not_stored"


def test_stored_response_routes_need_a_key_and_a_known_shape(
    native: tuple[Gateway, str, FakeUpstream],
) -> None:
    _gateway, url, _fake = native
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/v1/responses/resp_x").status_code == 401
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        for method, path in [
            ("POST", "/v1/responses/resp_x"),
            ("DELETE", "/v1/responses/resp_x/input_items"),
            ("GET", "/v1/responses/bad%20id"),
            ("GET", "/v1/responses/resp_x/other"),
        ]:
            answer = http.request(method, path, headers=auth)
            assert answer.status_code == 404, (method, path)
            assert answer.json()["error"]["code"] == "unknown_url"


def test_an_unreachable_owner_store_costs_the_lookup_not_the_answer(
    clients: list[openai.OpenAI],
) -> None:
    fake = FakeUpstream(FakeUpstreamConfig())
    with serve_in_thread(fake, startup_timeout_s=30) as upstream:
        # Nothing listens on port 1: every Redis call is refused at once (the other layers
        # fall back to their local policies).
        gateway = _config(upstream, native=True, redis=("redis://127.0.0.1:1/0", "tw:"))
        with serve_in_thread(gateway.asgi_app(), lifespan="on", startup_timeout_s=30) as url:
            acme = _client(clients, url, "acme")
            created = acme.responses.create(model="gpt-4.1", input="Hello there")
            assert created.output_text == TOKEN_TEXT * 5
            with pytest.raises(openai.InternalServerError) as caught:
                acme.responses.retrieve(created.id)
            assert caught.value.status_code == 503
            assert caught.value.code == "store_unavailable"
