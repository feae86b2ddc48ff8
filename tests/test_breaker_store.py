"""The circuit state machine, one suite for the memory store and the Redis store (real Redis).

Time is a hand-moved clock: the memory store reads it directly, the Redis store passes it to
its Lua script instead of Redis ``TIME``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tenantware.backends.redis_support import connect_redis
from tenantware.breaker import (
    CLOSED,
    FAILURE,
    HALF_OPEN,
    LIMITED,
    OPEN,
    PASS,
    PROBE,
    SLOW,
    SUCCESS,
    TIMEOUT,
    BreakerStore,
    CircuitPolicy,
    MemoryBreakerStore,
    RedisBreakerStore,
)
from tenantware.config import CircuitSettings

pytestmark = pytest.mark.anyio

KEY = "up/gpt-4.1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def policy(**overrides: float) -> CircuitPolicy:
    base = {
        "consecutive_failures": 5,
        "failure_rate_percent": 50.0,
        "minimum_calls": 100,
        "window_s": 60.0,
        "open_wait_s": 30.0,
        "max_open_wait_s": 100.0,
        "half_open_probes": 2,
    }
    base.update(overrides)
    return CircuitPolicy(CircuitSettings(**base))


@pytest.fixture(params=["memory", "redis"])
async def made(request: pytest.FixtureRequest) -> AsyncIterator[tuple[BreakerStore, Clock]]:
    clock = Clock()
    if request.param == "memory":
        yield MemoryBreakerStore(clock=clock), clock
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    redis = connect_redis(url, timeout_s=2.0)
    try:
        yield RedisBreakerStore(redis, prefix=prefix, clock=clock), clock
    finally:
        await redis.aclose()


async def record_all(store: BreakerStore, p: CircuitPolicy, outcomes: list[int]) -> None:
    for outcome in outcomes:
        await store.record(KEY, p, outcome)


async def test_five_consecutive_failures_open_and_a_success_in_between_keeps_closed(
    made: tuple[BreakerStore, Clock],
) -> None:
    store, _ = made
    p = policy()
    await record_all(store, p, [FAILURE] * 4 + [SUCCESS] + [FAILURE] * 4)
    assert store.state(KEY) == CLOSED
    assert store.gate(KEY) == PASS
    await store.record(KEY, p, FAILURE)
    assert store.state(KEY) == OPEN
    assert store.gate(KEY) == pytest.approx(30.0, abs=0.01)


@pytest.mark.parametrize(("failures", "opens"), [(50, True), (49, False)])
async def test_failure_rate_over_the_window_trips_at_the_threshold(
    made: tuple[BreakerStore, Clock], failures: int, opens: bool
) -> None:
    store, clock = made
    p = policy(consecutive_failures=1000)
    # 100 calls spread over 50 s of a 60 s window, the failures spread out, the last a failure.
    pattern = [FAILURE if i % 2 == 1 else SUCCESS for i in range(100)]
    if failures == 49:
        pattern[1] = SUCCESS
    assert pattern.count(FAILURE) == failures
    for index, outcome in enumerate(pattern):
        clock.now = 1_000.0 + index * 0.5
        await store.record(KEY, p, outcome)
        if index < 99:
            assert store.state(KEY) == CLOSED
    assert store.state(KEY) == (OPEN if opens else CLOSED)


async def test_failures_older_than_the_window_no_longer_count(
    made: tuple[BreakerStore, Clock],
) -> None:
    store, clock = made
    p = policy(consecutive_failures=1000, minimum_calls=10, window_s=10.0)
    await record_all(store, p, [SUCCESS] + [FAILURE] * 4)
    clock.now += 11.0
    await record_all(store, p, [SUCCESS] * 5 + [FAILURE] * 4 + [SUCCESS])
    # In the window: 10 calls, 4 failures (40 %); the first 4 failures slid out.
    assert store.state(KEY) == CLOSED
    await record_all(store, p, [FAILURE])
    assert store.state(KEY) == CLOSED  # 5 of 11
    await record_all(store, p, [FAILURE])
    assert store.state(KEY) == OPEN  # 6 of 12


async def test_slow_call_rate_trips(made: tuple[BreakerStore, Clock]) -> None:
    store, _ = made
    p = policy(minimum_calls=10)
    await record_all(store, p, [SLOW] * 9)
    await record_all(store, p, [FAILURE])
    assert store.state(KEY) == CLOSED
    p_slow = CircuitPolicy(
        CircuitSettings(minimum_calls=10, slow_call_rate_percent=80.0, window_s=60.0)
    )
    other = "up/slow-model"
    for _ in range(10):
        await store.record(other, p_slow, SLOW)
    if isinstance(store, RedisBreakerStore):
        await store.flush()
    assert store.state(other) == OPEN


async def test_a_timeout_is_a_failure_and_a_slow_call(made: tuple[BreakerStore, Clock]) -> None:
    store, _ = made
    # Neither 5 in a row nor the failure rate (100 %) trips here: only the slow-call rate can.
    p = policy(minimum_calls=4, failure_rate_percent=100.0, slow_call_rate_percent=50.0)
    await record_all(store, p, [SUCCESS, FAILURE, SUCCESS, TIMEOUT, TIMEOUT])
    if isinstance(store, RedisBreakerStore):
        await store.flush()
    assert store.state(KEY) == CLOSED  # 2 slow of 5 calls
    await record_all(store, p, [TIMEOUT])
    # 3 slow of 6 calls: the timeouts count as slow calls, and the rate opens the circuit.
    assert store.state(KEY) == OPEN


async def test_after_the_wait_exactly_n_probes_and_a_failing_probe_reopens_longer(
    made: tuple[BreakerStore, Clock],
) -> None:
    store, clock = made
    p = policy()
    await record_all(store, p, [FAILURE] * 5)
    assert store.state(KEY) == OPEN
    clock.now += 29.9
    assert store.gate(KEY) > 0
    clock.now += 0.2
    if isinstance(store, RedisBreakerStore):
        await store.refresh([KEY], p)
    assert store.gate(KEY) == PROBE
    granted = [await store.take_probe(KEY, p) for _ in range(5)]
    assert granted == [True, True, False, False, False]
    assert store.state(KEY) == HALF_OPEN
    assert store.gate(KEY) > 0
    await store.record(KEY, p, SUCCESS, probe=True)
    await store.record(KEY, p, FAILURE, probe=True)
    assert store.state(KEY) == OPEN
    assert store.gate(KEY) == pytest.approx(60.0, abs=0.01)
    clock.now += 60.1
    assert [await store.take_probe(KEY, p) for _ in range(3)] == [True, True, False]
    await store.record(KEY, p, FAILURE, probe=True)
    # Third opening: 120 s capped at 100 s.
    assert store.gate(KEY) == pytest.approx(100.0, abs=0.01)
    clock.now += 100.1
    assert await store.take_probe(KEY, p)
    assert await store.take_probe(KEY, p)
    await store.record(KEY, p, SUCCESS, probe=True)
    assert store.state(KEY) == HALF_OPEN
    await store.record(KEY, p, SUCCESS, probe=True)
    assert store.state(KEY) == CLOSED
    assert store.gate(KEY) == PASS


async def test_a_429_cools_for_its_retry_after_without_opening(
    made: tuple[BreakerStore, Clock],
) -> None:
    store, clock = made
    p = policy()
    for _ in range(10):
        await store.record(KEY, p, LIMITED, cool_s=2.0)
    assert store.state(KEY) == CLOSED
    assert store.gate(KEY) == pytest.approx(2.0, abs=0.01)
    clock.now += 2.01
    if isinstance(store, RedisBreakerStore):
        await store.refresh([KEY], p)
    assert store.gate(KEY) == PASS


async def test_two_redis_stores_share_one_circuit(redis_url: str, redis_prefix: str) -> None:
    clock = Clock()
    p = policy()
    first_client = connect_redis(redis_url, timeout_s=2.0)
    second_client = connect_redis(redis_url, timeout_s=2.0)
    try:
        first = RedisBreakerStore(first_client, prefix=redis_prefix, clock=clock)
        second = RedisBreakerStore(second_client, prefix=redis_prefix, clock=clock)
        await record_all(first, p, [FAILURE] * 3)
        await record_all(second, p, [FAILURE] * 2)
        # The second store's own failure returned the shared state at once.
        assert second.state(KEY) == OPEN
        await first.refresh([KEY], p)
        assert first.state(KEY) == CLOSED  # its copy is younger than the sync interval
        clock.now += 0.6
        await first.refresh([KEY], p)
        assert first.state(KEY) == OPEN
        assert first.gate(KEY) == pytest.approx(29.4, abs=0.01)
        clock.now += 30
        # Probe slots are shared: two in all, whichever process asks.
        assert await first.take_probe(KEY, p)
        assert await second.take_probe(KEY, p)
        assert not await first.take_probe(KEY, p)
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_on_redis_one_process_succeeding_does_not_reset_another_process_failures(
    redis_url: str, redis_prefix: str
) -> None:
    """The written rule: each process's run of failures since its own last success, added up
    over processes; a success resets only its own process's run."""
    clock = Clock()
    p = policy()
    first_client = connect_redis(redis_url, timeout_s=2.0)
    second_client = connect_redis(redis_url, timeout_s=2.0)
    try:
        failing = RedisBreakerStore(first_client, prefix=redis_prefix, clock=clock)
        healthy = RedisBreakerStore(second_client, prefix=redis_prefix, clock=clock)
        for _ in range(5):
            assert failing.state(KEY) == CLOSED
            await failing.record(KEY, p, FAILURE)
            # The other process keeps succeeding, and its successes reach Redis in between.
            await record_all(healthy, p, [SUCCESS] * 3)
            await healthy.flush()
        assert failing.state(KEY) == OPEN
        # Runs of two processes add up too: 3 + 2 failures since their own last success.
        clock.now += 31.0
        for store in (failing, healthy):
            assert await store.take_probe(KEY, p)
            await store.record(KEY, p, SUCCESS, probe=True)
        assert healthy.state(KEY) == CLOSED
        await record_all(failing, p, [FAILURE] * 3)
        await record_all(healthy, p, [FAILURE, SUCCESS])
        await healthy.flush()
        assert healthy.state(KEY) == CLOSED  # healthy's own success ended its run of one
        await record_all(healthy, p, [FAILURE] * 2)
        assert healthy.state(KEY) == OPEN  # 3 (failing) + 2 (healthy) in a row
        # Opening starts every run over: no per-process field is left behind.
        fields = await first_client.hkeys(healthy._redis_key(KEY))
        assert not [f for f in fields if (f if isinstance(f, str) else f.decode())[:2] == "p."]
    finally:
        await first_client.aclose()
        await second_client.aclose()


async def test_redis_successes_are_counted_locally_until_the_next_sync(
    redis_url: str, redis_prefix: str
) -> None:
    clock = Clock()
    p = policy()
    client = connect_redis(redis_url, timeout_s=2.0)
    try:
        store = RedisBreakerStore(client, prefix=redis_prefix, clock=clock)
        await record_all(store, p, [FAILURE] * 4)
        calls_before = int(await client.hget(store._redis_key(KEY), "tc") or 0)
        await record_all(store, p, [SUCCESS] * 50)
        assert int(await client.hget(store._redis_key(KEY), "tc") or 0) == calls_before
        clock.now += 1.0
        await store.refresh([KEY], p)
        assert int(await client.hget(store._redis_key(KEY), "tc") or 0) == calls_before + 50
        # The successes reset the consecutive count: four more failures do not open.
        await record_all(store, p, [FAILURE] * 4)
        assert store.state(KEY) == CLOSED
    finally:
        await client.aclose()


async def test_redis_outage_falls_back_to_local_circuits(redis_prefix: str) -> None:
    from tests.servers import find_free_port

    clock = Clock()
    p = policy()
    client = connect_redis(f"redis://127.0.0.1:{find_free_port()}", timeout_s=0.2)
    try:
        store = RedisBreakerStore(client, prefix=redis_prefix, clock=clock)
        calls = 0
        script = store._script

        async def counting(**kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return await script(**kwargs)

        store._script = counting
        await record_all(store, p, [FAILURE] * 5)
        assert store.gate(KEY) == pytest.approx(30.0, abs=0.01)
        # One failed call to Redis; then local decisions until the sync interval has passed.
        assert calls == 1
        clock.now += 0.6
        await store.refresh([KEY], p)
        assert calls == 2
    finally:
        await client.aclose()


async def test_probes_lost_for_a_whole_open_period_are_granted_afresh(
    made: tuple[BreakerStore, Clock],
) -> None:
    store, clock = made
    p = policy()
    await record_all(store, p, [FAILURE] * 5)
    clock.now += 30.0
    assert await store.take_probe(KEY, p)
    assert await store.take_probe(KEY, p)
    # Both probes' process died: no answer ever comes.
    clock.now += 29.0
    if isinstance(store, RedisBreakerStore):
        await store.refresh([KEY], p)
    assert not await store.take_probe(KEY, p)
    clock.now += 1.0
    if isinstance(store, RedisBreakerStore):
        await store.refresh([KEY], p)
    assert store.gate(KEY) == PROBE
    assert await store.take_probe(KEY, p)
    await store.record(KEY, p, SUCCESS, probe=True)
    assert await store.take_probe(KEY, p)
    await store.record(KEY, p, SUCCESS, probe=True)
    assert store.state(KEY) == CLOSED
