"""Proofs of issue 5 through the whole gateway: fake upstreams with injected faults, a clock
moved by hand for the breaker, real sockets where timeouts and broken streams matter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import anyio
import httpx
import pytest

from tenantware import Gateway, HttpxUpstreamClient, KeyHasher, get_context, parse_config
from tenantware.breaker import CLOSED, OPEN, MemoryBreakerStore
from tenantware.metrics import BREAKER_STATE, REGISTRY
from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tenantware.types import Receive, Scope, Send
from tests.support import CHAT, KEYS, client_for, tenant_entries

pytestmark = pytest.mark.anyio

SERVED = "x-tenantware-model"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Hosts:
    """One in-process ASGI app per upstream host name."""

    def __init__(self, **apps: FakeUpstream) -> None:
        self.apps = {f"{name}.test": app for name, app in apps.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = dict(scope["headers"])[b"host"].decode()
        await self.apps[host](scope, receive, send)


def upstream(name: str, *models: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "base_url": f"http://{name}.test/v1", "models": list(models), **extra}


def gateway_for(
    hosts: Hosts,
    upstreams: list[dict[str, Any]],
    breaker: dict[str, Any],
    *,
    redis: tuple[str, str] | None = None,
    **extra: Any,
) -> tuple[Gateway, Clock]:
    """A gateway over in-process upstreams; with ``redis`` (url, prefix) circuits live there
    (real time), else in memory on a clock the test moves."""
    data = {
        "tenants": extra.pop("tenants", tenant_entries()),
        "upstreams": upstreams,
        "breaker": breaker,
        **extra,
    }
    if redis is not None:
        data["gateway"] = {"redis_url": redis[0], "redis_prefix": redis[1]}
    client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=hosts))
    gateway = Gateway(parse_config(data), upstream_client=client)
    clock = Clock()
    store = gateway.board.store
    if redis is None:
        assert isinstance(store, MemoryBreakerStore)
        store.clock = clock
    return gateway, clock


def deployment(settings: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "open_wait_s": 30.0,
        "half_open_probes": 2,
        "minimum_calls": 100,
        **(settings or {}),
        **more,
    }


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


async def test_five_consecutive_5xx_open_and_an_interleaved_success_keeps_closed(
    store_kind: tuple[str, str] | None,
) -> None:
    fake = FakeUpstream()
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 1, "deployment": deployment()},
        redis=store_kind,
    )
    BREAKER_STATE.labels("primary", "gpt-4.1").set(CLOSED)
    key = "primary/gpt-4.1"
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        fake.config.fail_next = [500] * 4 + [200] + [500] * 4
        statuses = [
            (await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(9)
        ]
        assert statuses == [500] * 4 + [200] + [500] * 4
        assert gateway.board.state(key) == CLOSED
        fake.config.fail_next = [500]
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 500
        assert gateway.board.state(key) == OPEN
        gauge = REGISTRY.get_sample_value(
            "tenantware_breaker_state", {"upstream": "primary", "model": "gpt-4.1"}
        )
        assert gauge == OPEN
        before = fake.stats.requests
        rejected = await client.post("/v1/chat/completions", json=CHAT)
    await gateway.aclose()
    assert fake.stats.requests == before
    assert rejected.status_code == 503
    assert rejected.json()["error"]["code"] == "circuit_open"
    assert rejected.headers["retry-after"] == "30"
    assert rejected.headers["x-should-retry"] == "true"


@pytest.mark.parametrize(("failures", "opens"), [(50, True), (49, False)])
async def test_failure_rate_of_50_percent_trips_and_49_does_not(failures: int, opens: bool) -> None:
    statuses = [500 if i % 2 == 1 else 200 for i in range(100)]
    if failures == 49:
        statuses[1] = 200
    fake = FakeUpstream(FakeUpstreamConfig(fail_next=statuses))
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 1, "deployment": deployment(consecutive_failures=50, window_s=60.0)},
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        for _ in range(100):
            await client.post("/v1/chat/completions", json=CHAT)
    assert fake.stats.requests == 100
    assert gateway.board.state("primary/gpt-4.1") == (OPEN if opens else CLOSED)


def _capture(gateway: Gateway, seen: list[Any]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await gateway.proxy(scope, receive, send)
        seen.append(get_context(scope))

    return gateway.wrap(app)


async def test_open_circuit_sends_all_traffic_to_the_fallback_and_only_n_probes_to_primary() -> (
    None
):
    primary, backup = FakeUpstream(), FakeUpstream()
    gateway, clock = gateway_for(
        Hosts(primary=primary, backup=backup),
        [upstream("primary", "gpt-4.1"), upstream("backup", "gemini-2.5-flash")],
        {
            "max_attempts": 2,
            "fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]},
            "deployment": deployment(consecutive_failures=3),
        },
    )
    key = "primary/gpt-4.1"
    seen: list[Any] = []
    async with client_for(_capture(gateway, seen), KEYS["acme"]) as client:
        primary.config.fail_next = [500] * 3
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=CHAT)
            # The failed primary call is retried at once on the fallback model.
            assert response.status_code == 200
            assert response.headers[SERVED] == "gemini-2.5-flash"
        assert gateway.board.state(key) == OPEN
        assert seen[-1].model == "gpt-4.1"
        assert seen[-1].model_served == "gemini-2.5-flash"  # what metering charges
        assert backup.last_request is not None
        assert backup.last_request.json()["model"] == "gemini-2.5-flash"

        for _ in range(10):
            response = await client.post("/v1/chat/completions", json=CHAT)
            assert response.headers[SERVED] == "gemini-2.5-flash"
        assert primary.stats.requests == 3
        assert backup.stats.requests == 13

        clock.now += 30.0
        primary.config.latency_s = 0.3  # probes stay in flight while the others arrive
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await client.post("/v1/chat/completions", json=CHAT))

        async with anyio.create_task_group() as group:
            for _ in range(6):
                group.start_soon(one)
        assert primary.stats.requests == 3 + 2
        assert (
            sorted(r.headers[SERVED] for r in results) == ["gemini-2.5-flash"] * 4 + ["gpt-4.1"] * 2
        )
        assert gateway.board.state(key) == CLOSED
        primary.config.latency_s = 0

        # Open again, then a failing probe re-opens it for twice as long.
        primary.config.fail_next = [500] * 3
        for _ in range(3):
            await client.post("/v1/chat/completions", json=CHAT)
        assert gateway.board.state(key) == OPEN
        first_wait = gateway.board.gate(key)
        clock.now += first_wait
        primary.config.fail_next = [500]
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.headers[SERVED] == "gemini-2.5-flash"
        assert gateway.board.state(key) == OPEN
        assert gateway.board.gate(key) == pytest.approx(2 * first_wait, abs=0.01)


async def test_fallback_only_to_models_the_tenant_may_use() -> None:
    primary, backup = FakeUpstream(), FakeUpstream()
    hasher = KeyHasher()
    narrow = {
        "id": "narrow",
        "tier": "pro",
        "allowed_models": ["gpt-4.1"],
        "keys": [{"id": "n-1", "hash": hasher.hash("sk-narrow")}],
    }
    gateway, _ = gateway_for(
        Hosts(primary=primary, backup=backup),
        [upstream("primary", "gpt-4.1"), upstream("backup", "gemini-2.5-flash")],
        {
            "max_attempts": 1,
            "fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]},
            "deployment": deployment(consecutive_failures=1),
        },
        tenants=[*tenant_entries(), narrow],
    )
    primary.config.fail_next = [500]
    async with client_for(gateway.asgi_app(), "sk-narrow") as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 500
        rejected = await client.post("/v1/chat/completions", json=CHAT)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        allowed = await client.post("/v1/chat/completions", json=CHAT)
    assert rejected.status_code == 503
    assert rejected.json()["error"]["code"] == "circuit_open"
    assert backup.stats.requests == 1
    assert allowed.headers[SERVED] == "gemini-2.5-flash"


async def test_upstream_429_moves_traffic_to_another_deployment_for_its_retry_after() -> None:
    first, second = FakeUpstream(), FakeUpstream()
    gateway, clock = gateway_for(
        Hosts(first=first, second=second),
        [upstream("first", "gpt-4.1"), upstream("second", "gpt-4.1")],
        {"strategy": "least_busy", "deployment": deployment(consecutive_failures=1)},
    )
    first.config.fail_next = [429]
    first.config.retry_after_s = 2
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert (first.stats.requests, second.stats.requests) == (1, 1)
        for _ in range(5):
            clock.now += 0.3
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (first.stats.requests, second.stats.requests) == (1, 6)
        # Not a failure of the deployment: its circuit never opened.
        assert gateway.board.state("first/gpt-4.1") == CLOSED
        clock.now += 0.6
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert (first.stats.requests, second.stats.requests) == (2, 6)


async def test_upstream_4xx_is_relayed_once_and_never_trips() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(fail_next=[400] * 10))
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"deployment": deployment(consecutive_failures=2), "tenant": {"consecutive_failures": 50}},
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        for _ in range(10):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 400
    assert fake.stats.requests == 10
    assert gateway.board.state("primary/gpt-4.1") == CLOSED


async def test_retries_back_off_and_stop_at_max_attempts() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(fail_next=[502, 503, 200]))
    gateway, _ = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 3, "retry_base_s": 0.01, "deployment": deployment()},
    )
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        ok = await client.post("/v1/chat/completions", json=CHAT)
        fake.config.fail_next = [502] * 4
        failed = await client.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200
    assert failed.status_code == 502
    assert fake.stats.requests == 3 + 3


async def test_stream_failing_midway_is_not_retried_and_ends_well_formed() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=20, fail_stream_after=3))
    with serve_in_thread(fake) as url:
        config = parse_config(
            {
                "tenants": tenant_entries(),
                "upstreams": [
                    {"name": "a", "base_url": url + "/v1", "models": ["gpt-4.1"]},
                    {"name": "b", "base_url": url + "/v1", "models": ["gpt-4.1"]},
                ],
                "breaker": {"max_attempts": 3},
            }
        )
        gateway = Gateway(config)
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        finally:
            await gateway.proxy.aclose()
    assert fake.stats.requests == 1
    assert response.status_code == 200
    assert response.text.endswith("\n\n")
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "upstream_error"
    assert all(json.loads(e) for e in events)
    # The broken stream still counts against the deployment that served it.
    store = gateway.board.store
    assert isinstance(store, MemoryBreakerStore)
    policy = gateway.board.deployment_policy
    failures = {key: store.circuit(key, policy).consecutive for key in ("a/gpt-4.1", "b/gpt-4.1")}
    assert sorted(failures.values()) == [0, 1]


async def test_latency_of_errors_is_bounded_once_the_circuit_is_open() -> None:
    timeout_s = 0.4
    fake = FakeUpstream(FakeUpstreamConfig(latency_s=1.5))
    with serve_in_thread(fake) as url:
        config = parse_config(
            {
                "tenants": tenant_entries(),
                "upstreams": [
                    {
                        "name": "a",
                        "base_url": url + "/v1",
                        "models": ["gpt-4.1"],
                        "timeout_s": timeout_s,
                    }
                ],
                "breaker": {"max_attempts": 1, "deployment": {"consecutive_failures": 2}},
            }
        )
        gateway = Gateway(config)
        try:
            async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
                for _ in range(2):
                    started = time.perf_counter()
                    response = await client.post("/v1/chat/completions", json=CHAT)
                    assert response.status_code == 504
                    assert time.perf_counter() - started >= timeout_s * 0.9
                latencies = []
                for _ in range(30):
                    started = time.perf_counter()
                    response = await client.post("/v1/chat/completions", json=CHAT)
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 503
        finally:
            await gateway.proxy.aclose()
    # Once open, no request waits for the upstream timeout (generous margin for a busy box).
    assert max(latencies) < timeout_s / 2
    assert fake.stats.requests == 2


async def test_a_tenant_failing_repeatedly_is_paused_alone() -> None:
    fake = FakeUpstream()
    gateway, clock = gateway_for(
        Hosts(primary=fake),
        [upstream("primary", "gpt-4.1", "gemini-2.5-flash")],
        {"tenant": {"consecutive_failures": 3, "open_wait_s": 10.0, "half_open_probes": 1}},
    )
    bad = {"model": "gemini-2.5-flash", "messages": []}
    good = {**CHAT, "model": "gemini-2.5-flash"}
    async with (
        client_for(gateway.asgi_app(), KEYS["hobby"]) as hobby,
        client_for(gateway.asgi_app(), KEYS["acme"]) as acme,
    ):
        for _ in range(3):
            assert (await hobby.post("/v1/chat/completions", json=bad)).status_code == 400
        paused = await hobby.post("/v1/chat/completions", json=good)
        assert paused.status_code == 429
        assert paused.json()["error"]["code"] == "tenant_circuit_open"
        assert paused.headers["retry-after"] == "10"
        assert paused.headers["x-should-retry"] == "false"
        assert (await acme.post("/v1/chat/completions", json=good)).status_code == 200
        clock.now += 10.0
        assert (await hobby.post("/v1/chat/completions", json=good)).status_code == 200
        assert (await hobby.post("/v1/chat/completions", json=good)).status_code == 200
    assert gateway.board.state("tenant:hobby") == CLOSED


async def test_breaker_protects_any_inner_app_from_its_status() -> None:
    gateway, clock = gateway_for(Hosts(), [], {"deployment": deployment(consecutive_failures=2)})
    calls = 0
    status = 500

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    async with client_for(gateway.wrap(app), KEYS["acme"]) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)
        ]
        assert statuses == [500, 500, 503, 503]
        assert calls == 2
        assert gateway.board.state("app/gpt-4.1") == OPEN
        clock.now += 30.0
        status = 200
        statuses = [
            (await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)
        ]
    # Two probes (the configured number) reach the app, succeed and close the circuit.
    assert statuses == [200, 200, 200]
    assert calls == 5
    assert gateway.board.state("app/gpt-4.1") == CLOSED


_OTHER_PROCESS = textwrap.dedent(
    """
    import anyio, httpx, sys
    from tenantware import Gateway, HttpxUpstreamClient
    from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
    from tests.support import CHAT, KEYS, client_for, make_config

    async def main():
        fake = FakeUpstream(FakeUpstreamConfig(fail_next=[500] * 5))
        config = make_config(
            gateway={"redis_url": sys.argv[1], "redis_prefix": sys.argv[2]},
            breaker={"max_attempts": 1},
        )
        client = HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
        gateway = Gateway(config, upstream_client=client)
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as http:
            for _ in range(5):
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 500
        await gateway.aclose()
        print("tripped", fake.stats.requests)

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_two_gateway_processes_sharing_redis_see_the_same_open_circuit(
    redis_url: str, redis_prefix: str
) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, redis_url, redis_prefix],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "tripped 5"
    assert result.stdout.count("circuit state changed") == 1
    fake = FakeUpstream()
    from tests.support import make_config

    config = make_config(
        gateway={"redis_url": redis_url, "redis_prefix": redis_prefix},
        breaker={"max_attempts": 1},
    )
    gateway = Gateway(
        config, upstream_client=HttpxUpstreamClient(transport=httpx.ASGITransport(app=fake))
    )
    try:
        async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
    finally:
        await gateway.aclose()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "circuit_open"
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert fake.stats.requests == 0


async def test_reloaded_fallbacks_and_thresholds_apply_to_the_next_request() -> None:
    primary, backup = FakeUpstream(), FakeUpstream()
    upstreams = [upstream("primary", "gpt-4.1"), upstream("backup", "gemini-2.5-flash")]
    gateway, _ = gateway_for(
        Hosts(primary=primary, backup=backup),
        upstreams,
        {"max_attempts": 2, "deployment": deployment(consecutive_failures=1)},
    )
    primary.config.fail_next = [500, 500]
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 500
        gateway.live.replace(
            parse_config(
                {
                    "tenants": tenant_entries(),
                    "upstreams": upstreams,
                    "breaker": {"max_attempts": 2, "fallbacks": {"gpt-4.1": ["gemini-2.5-flash"]}},
                }
            )
        )
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers[SERVED] == "gemini-2.5-flash"
    assert gateway.board.deployment_policy.consecutive == 5


async def test_a_complete_stream_is_a_success_not_a_client_disconnect() -> None:
    fake = FakeUpstream(FakeUpstreamConfig(stream_chunks=3))
    gateway, _ = gateway_for(Hosts(primary=fake), [upstream("primary", "gpt-4.1")], {})
    seen: list[Any] = []
    async with client_for(_capture(gateway, seen), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers[SERVED] == "gpt-4.1"
    assert seen[-1].outcome == "ok"


class Recording:
    """An upstream app that keeps every request body it is sent."""

    def __init__(self, app: FakeUpstream) -> None:
        self.app = app
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        self.bodies.append(body)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def test_a_retried_translated_request_is_translated_once_and_sent_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tenantware.formats import responses

    translations = []
    translate = responses.request_to_chat

    def counted(body: dict[str, Any], model: str) -> dict[str, Any]:
        translations.append(model)
        return translate(body, model)

    monkeypatch.setattr(responses, "request_to_chat", counted)
    fake = FakeUpstream(FakeUpstreamConfig(fail_next=[502, 503, 200]))
    recording = Recording(fake)
    gateway, _ = gateway_for(
        Hosts(primary=recording),  # type: ignore[arg-type]
        [upstream("primary", "gpt-4.1")],
        {"max_attempts": 3, "retry_base_s": 0.01, "deployment": deployment()},
    )
    request = {"model": "gpt-4.1", "input": "Hello there", "max_output_tokens": 5}
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        answered = await client.post("/v1/responses", json=request)
    assert answered.status_code == 200
    assert answered.json()["object"] == "response"
    assert len(recording.bodies) == 3
    assert len(set(recording.bodies)) == 1
    assert json.loads(recording.bodies[0])["max_tokens"] == 5
    assert translations == ["gpt-4.1"]
