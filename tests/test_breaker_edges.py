"""Proofs of issue 24: the breaker's edges (retries into a circuit that opened meanwhile, what
a 503 says, refusals of the tenant layer, consecutive failures counted across processes, and
a hanging upstream on default settings)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway
from tenantware.breaker import CLOSED, OPEN
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.support import CHAT, KEYS, client_for, make_config
from tests.test_breaker_proxy import Hosts, deployment, gateway_for, upstream

pytestmark = pytest.mark.anyio

URL = "/v1/chat/completions"


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


async def test_a_retry_after_its_backoff_does_not_call_a_circuit_that_opened_meanwhile(
    store_kind: tuple[str, str] | None,
) -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 2, "deployment": deployment(consecutive_failures=2)},
        redis=store_kind,
    )
    key = "primary/gpt-4.1"
    dispatcher = gateway.proxy.dispatcher
    asleep, wake = anyio.Event(), anyio.Event()

    def backoff(retry: int) -> float:
        asleep.set()
        return 1.0

    async def held_backoff(delay: float) -> None:
        await wake.wait()

    dispatcher.router.backoff = backoff  # type: ignore[method-assign]

    fake.config.fail_next = [500, 500]
    first: list[httpx.Response] = []
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:

        async def send_first() -> None:
            first.append(await client.post(URL, json=CHAT))

        async with anyio.create_task_group() as group:
            dispatcher.sleep = held_backoff
            group.start_soon(send_first)
            # The first request failed on the only deployment and sleeps its backoff ...
            with anyio.fail_after(30):
                await asleep.wait()
            dispatcher.sleep = anyio.sleep
            # ... while another request's failure opens the circuit.
            second = await client.post(URL, json=CHAT)
            assert second.status_code == 500
            assert gateway.board.state(key) == OPEN
            opened_at = fake.stats.requests
            wake.set()
    await gateway.aclose()
    assert opened_at == 2
    # No call reached the upstream after its circuit opened; the first request got the
    # answer of its own failed call.
    assert fake.stats.requests == opened_at
    assert first[0].status_code == 500


async def test_503_says_the_only_deployment_is_cooling_after_a_429_with_exact_retry_after() -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 1, "deployment": deployment()},
    )
    fake.config.fail_next = [429]
    fake.config.retry_after_s = 7
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post(URL, json=CHAT)).status_code == 429
        cooling = await client.post(URL, json=CHAT)
    await gateway.aclose()
    assert gateway.board.state("primary/gpt-4.1") == CLOSED
    assert cooling.status_code == 503
    error = cooling.json()["error"]
    assert error["code"] == "upstream_cooling"
    assert "429" in error["message"]
    assert "circuit breaker is open" not in error["message"]
    assert cooling.headers["retry-after"] == "7"
    assert fake.stats.requests == 1


async def test_503_says_open_and_cooling_when_the_fallback_cools_and_the_primary_is_open() -> None:
    primary, backup = FakeUpstream(), FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=primary, backup=backup),
        [upstream("primary", "gpt-4.1"), upstream("backup", "gemini-2.5-flash")],
        {
            "max_attempts": 2,
            "fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]},
            "deployment": deployment(consecutive_failures=1),
        },
    )
    primary.config.fail_next = [500]
    backup.config.fail_next = [429]
    backup.config.retry_after_s = 4
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post(URL, json=CHAT)).status_code == 429
        both = await client.post(URL, json=CHAT)
    await gateway.aclose()
    assert both.status_code == 503
    assert both.json()["error"]["code"] == "circuit_open_and_cooling"
    # The first to return is the fallback, after its retry-after (the primary waits 30 s).
    assert both.headers["retry-after"] == "4"


async def test_503_of_an_open_circuit_keeps_its_code() -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 1, "deployment": deployment(consecutive_failures=1)},
    )
    fake.config.fail_next = [500]
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post(URL, json=CHAT)).status_code == 500
        opened = await client.post(URL, json=CHAT)
    await gateway.aclose()
    assert opened.json()["error"]["code"] == "circuit_open"
    assert "circuit breaker is open" in opened.json()["error"]["message"]
    assert opened.headers["retry-after"] == "30"


@pytest.mark.parametrize("counted", [True, False])
async def test_a_tenant_looping_on_malformed_json_is_paused_after_the_threshold(
    counted: bool, store_kind: tuple[str, str] | None
) -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {
            "count_tenant_refusals": counted,
            "tenant": {"consecutive_failures": 5, "open_wait_s": 10.0, "half_open_probes": 1},
        },
        redis=store_kind,
    )
    malformed = b'{"model": "gpt-4.1", "messages": ['
    unknown_model = {**CHAT, "model": "no-such-model"}
    headers = {"content-type": "application/json"}
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        statuses = [
            (await client.post(URL, content=malformed, headers=headers)).status_code
            for _ in range(4)
        ]
        statuses.append((await client.post(URL, json=unknown_model)).status_code)
        looping = await client.post(URL, content=malformed, headers=headers)
        valid = await client.post(URL, json=CHAT)
    await gateway.aclose()
    assert statuses == [400] * 4 + [404]
    if counted:
        # The five refusals of the tenant layer opened acme's circuit: acme is paused, the
        # looping request included, and nothing reached the upstream.
        for paused in (looping, valid):
            assert paused.status_code == 429
            assert paused.json()["error"]["code"] == "tenant_circuit_open"
            assert paused.headers["retry-after"] == "10"
        assert gateway.board.state("tenant:acme") == OPEN
        assert fake.stats.requests == 0
    else:
        assert looping.status_code == 400
        assert valid.status_code == 200
        assert gateway.board.state("tenant:acme") == CLOSED


def _served_config(url: str, **upstream_settings: Any) -> Any:
    """One upstream at ``url`` with default timeouts unless given, default breaker."""
    return make_config(
        url + "/v1",
        upstreams=[
            {"name": "fake", "base_url": url + "/v1", "models": ["gpt-4.1"], **upstream_settings}
        ],
    )


@pytest.mark.slow
async def test_a_hanging_upstream_on_default_settings_opens_the_circuit_and_the_pile_up_stops() -> (
    None
):
    """Default timeouts and breaker, the default (aiohttp) client over a real socket: an
    upstream that never answers costs each waiting client the first-byte timeout, not the
    total, and once its failures open the circuit no more calls reach it."""
    fake = FakeUpstream(FakeUpstreamConfig(latency_s=3600.0))  # hangs before any byte
    workers, per_worker = 20, 10
    statuses: list[int] = []
    with serve_in_thread(fake, timeout_graceful_shutdown=1) as url:
        gateway = Gateway(_served_config(url))
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:

                async def worker() -> None:
                    for _ in range(per_worker):
                        response = await client.post(
                            URL, json={**CHAT, "stream": True}, timeout=None
                        )
                        statuses.append(response.status_code)

                # A guard against the old behaviour (a 600 s wait), not a timing assertion.
                with anyio.fail_after(120):
                    async with anyio.create_task_group() as group:
                        for _ in range(workers):
                            group.start_soon(worker)
            state = gateway.board.state("fake/gpt-4.1")
        finally:
            await gateway.aclose()
    assert state == OPEN
    assert len(statuses) == workers * per_worker
    # Each worker's first request waited for the upstream (at most max_attempts calls, and a
    # retry after the circuit opened is not made); every later one was refused at once.
    assert fake.stats.requests <= workers * 3
    assert statuses.count(503) >= workers * (per_worker - 1)
    assert set(statuses) <= {503, 504}


async def test_a_stream_waits_for_its_first_byte_briefly_a_whole_answer_for_the_total() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(latency_s=1.0))
    with serve_in_thread(fake, timeout_graceful_shutdown=1) as url:
        gateway = Gateway(_served_config(url, first_byte_timeout_s=0.3, timeout_s=30.0))
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                stream = await client.post(URL, json={**CHAT, "stream": True})
                whole = await client.post(URL, json=CHAT)
        finally:
            await gateway.aclose()
    # The stream's headers did not come within its first-byte timeout: a timeout (504)...
    assert stream.status_code == 504
    assert stream.json()["error"]["code"] == "upstream_timeout"
    # ... while a non-streaming answer (whose headers come with the whole answer) may take
    # as long as the total timeout.
    assert whole.status_code == 200


async def test_the_total_timeout_cuts_a_steady_stream_the_idle_timeout_lets_run() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=40, chunk_delay_s=0.05))
    with serve_in_thread(fake, timeout_graceful_shutdown=1) as url:
        gateway = Gateway(_served_config(url, idle_timeout_s=1.0, timeout_s=0.5))
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                response = await client.post(URL, json={**CHAT, "stream": True})
        finally:
            await gateway.aclose()
    assert response.status_code == 200
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    assert response.text.count("tok ") < 40


def test_default_timeouts_contain_a_hang_and_a_stall_well_before_the_total() -> None:
    """Issue 21: the wait between a stream's events is not the total; the defaults let
    neither a hanging nor a stalled upstream hold a client for the whole call."""
    from tenantware.config import Upstream
    from tenantware.proxy.dispatch import _Target

    target = _Target(Upstream(name="u", base_url="https://u.example/v1"))
    stream, whole = target.stream_timeouts, target.whole_timeouts
    assert stream.total_s == whole.total_s == 600
    assert stream.first_byte_s * 10 <= stream.idle_s < stream.total_s / 2
    # A whole answer's headers come with the answer: only the total bounds them.
    assert whole.first_byte_s == whole.total_s


async def test_a_tenant_looping_on_a_model_its_key_may_not_use_is_paused() -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1", "gemini-2.5-flash")],
        {"tenant": {"consecutive_failures": 3, "open_wait_s": 10.0, "half_open_probes": 1}},
    )
    async with client_for(gateway.asgi_app(), KEYS["hobby"]) as client:
        statuses = [(await client.post(URL, json=CHAT)).status_code for _ in range(4)]
    await gateway.aclose()
    # hobby may use gemini only: three 403s, then the pause.
    assert statuses == [403, 403, 403, 429]
    assert fake.stats.requests == 0
