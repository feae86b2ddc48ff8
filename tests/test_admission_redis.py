"""The Redis seat pool across processes: shared fairness, leases, heartbeats, failure policy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tenantware.admission.core import GRANTED, QUEUED, Ticket
from tenantware.admission.redis import RedisSeatStore
from tenantware.backends.redis_support import connect_redis
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig
from tests.admission_worker import WEIGHTS
from tests.servers import (
    ServiceUnavailable,
    find_free_port,
    throwaway_redis,
)
from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_processes_sharing_redis_keep_the_weighted_shares(redis_prefix: str) -> None:
    # A private Redis: the shared one also serves other suites, whose load would be noise here.
    try:
        with throwaway_redis() as server:
            counts = _run_two_workers(server.url, redis_prefix)
    except ServiceUnavailable as exc:
        pytest.skip(f"no private Redis: {exc.reason}")
    total = sum(counts.values())
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] / total - weight) <= 0.15 * weight, counts


def _run_two_workers(url: str, prefix: str) -> dict[str, int]:
    args = [url, prefix, "6"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.admission_worker", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n", proc.stderr and proc.stderr.read()[-2000:]
    start = time.time() + 0.5
    stop = start + 5.0
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start!r} {stop!r}\n".encode())
        proc.stdin.close()
    results = []
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stderr is not None
        with proc:
            out = proc.stdout.read()
            assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
        results.append(msgspec.json.decode(out, type=dict[str, list[float]]))
    # Both processes were served (fairness is global, not per process).
    for result in results:
        assert sum(len(times) for times in result.values()) > 50, results
    return {
        name: sum(1 for result in results for t in result[name] if start + 1.0 <= t < stop)
        for name in WEIGHTS
    }


async def test_a_dead_process_seats_come_back_after_the_lease(
    redis_url: str, redis_prefix: str
) -> None:
    async with connect_redis(redis_url, timeout_s=2.0) as client:
        dead = RedisSeatStore(client, seats=1, prefix=redis_prefix, lease_s=0.3)
        alive = RedisSeatStore(client, seats=1, prefix=redis_prefix, lease_s=0.3)
        assert await dead.acquire(Ticket("a", 1.0, 10.0)) == GRANTED
        # ... and the process holding it never releases (nor renews).
        waiter = Ticket("b", 1.0, 10.0)
        assert await alive.acquire(waiter) == QUEUED
        started = time.perf_counter()
        with anyio.fail_after(3.0):
            await alive.wait(waiter)
        assert time.perf_counter() - started >= 0.2
        state = await alive.state()
        assert state["tenants"]["a"]["held"] == 0
        assert state["tenants"]["b"]["held"] == 1
        await alive.release(waiter, 10.0)


async def test_a_dead_process_queued_tickets_expire(redis_url: str, redis_prefix: str) -> None:
    async with connect_redis(redis_url, timeout_s=2.0) as client:
        store = RedisSeatStore(client, seats=1, prefix=redis_prefix, heartbeat_s=0.2)
        holder = Ticket("a", 1.0, 10.0)
        assert await store.acquire(holder) == GRANTED
        assert await store.acquire(Ticket("ghost", 1.0, 10.0)) == QUEUED
        await anyio.sleep(0.4)
        state = await store.state()
        assert state["waiting"] == 0
        assert state["tenants"]["ghost"]["queued"] == 0
        await store.release(holder, 10.0)
        assert (await store.state())["in_use"] == 0


async def test_leases_held_are_renewed(redis_url: str, redis_prefix: str) -> None:
    async with connect_redis(redis_url, timeout_s=2.0) as client:
        store = RedisSeatStore(client, seats=1, prefix=redis_prefix, lease_s=0.3)
        holder = Ticket("a", 1.0, 10.0)
        assert await store.acquire(holder) == GRANTED
        async with anyio.create_task_group() as group:
            group.start_soon(store.run_forever)
            await anyio.sleep(0.8)
            assert (await store.state())["tenants"]["a"]["held"] == 1
            group.cancel_scope.cancel()
        await store.release(holder, 10.0)


async def test_a_grant_in_one_process_wakes_a_waiter_in_another(
    redis_url: str, redis_prefix: str
) -> None:
    async with (
        connect_redis(redis_url, timeout_s=2.0) as one_client,
        connect_redis(redis_url, timeout_s=2.0) as other_client,
    ):
        one = RedisSeatStore(one_client, seats=1, prefix=redis_prefix, poll_max_s=5.0)
        other = RedisSeatStore(other_client, seats=1, prefix=redis_prefix, poll_max_s=5.0)
        holder = Ticket("a", 1.0, 10.0)
        assert await one.acquire(holder) == GRANTED
        waiter = Ticket("b", 1.0, 10.0)
        async with anyio.create_task_group() as group:
            group.start_soon(other.run_forever)
            await anyio.sleep(0.1)
            assert await other.acquire(waiter) == QUEUED
            waited = anyio.Event()

            async def wait() -> None:
                await other.wait(waiter)
                waited.set()

            group.start_soon(wait)
            await anyio.sleep(0.3)  # past the first polls: backoff is now long
            released = time.perf_counter()
            await one.release(holder, 10.0)
            with anyio.fail_after(1.0):
                await waited.wait()
            assert time.perf_counter() - released < 0.5
            group.cancel_scope.cancel()
        await other.release(waiter, 10.0)


async def test_gateway_with_redis_queues_and_serves(redis_url: str, redis_prefix: str) -> None:
    config = make_config(
        admission={"seats": 1},
        gateway={"redis_url": redis_url, "redis_prefix": redis_prefix, "redis_timeout_s": 2.0},
    )
    fake = FakeUpstream(FakeUpstreamConfig(latency_s=0.05))
    gateway, _ = in_process_gateway(fake, config)
    statuses: list[int] = []
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        async with anyio.create_task_group() as group:

            async def one() -> None:
                response = await client.post("/v1/chat/completions", json=CHAT)
                statuses.append(response.status_code)

            for _ in range(4):
                group.start_soon(one)
        state = (await gateway.admission.state())["*"]
    assert statuses == [200] * 4
    assert state["in_use"] == 0
    assert state["waiting"] == 0


@pytest.mark.parametrize(("policy", "status"), [("open", 200), ("local", 200), ("closed", 503)])
async def test_redis_down_follows_the_failure_policy(policy: str, status: int) -> None:
    url = f"redis://127.0.0.1:{find_free_port()}/0"
    config = make_config(
        admission={"seats": 1},
        quota={"enabled": False},  # the quota layer would answer first with its own policy
        gateway={"redis_url": url, "on_store_failure": policy, "redis_timeout_s": 0.05},
    )
    gateway, _ = in_process_gateway(config=config)
    async with client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == status
    if status == 503:
        assert response.json()["error"]["code"] == "store_unavailable"
        assert "retry-after" in response.headers
    await gateway.aclose()


@pytest.mark.slow
async def test_the_script_runs_on_a_redis_cluster(cluster_urls: list[str]) -> None:
    # Every key of a pool shares the pool's hash tag, so the script's keys live in one slot.
    client = connect_redis(cluster_urls[0], timeout_s=2.0, cluster=True)
    store = RedisSeatStore(client, seats=1, prefix="twcluster:")
    first, second = Ticket("a", 1.0, 10.0), Ticket("b", 1.0, 10.0)
    assert await store.acquire(first) == GRANTED
    assert await store.acquire(second) == QUEUED
    await store.release(first, 10.0)
    assert second.granted
    state = await store.state()
    assert state["tenants"]["b"]["held"] == 1
    await store.release(second, 10.0)
    await client.aclose()


@pytest.mark.slow
async def test_the_grant_listener_starts_on_a_fresh_cluster_client(cluster_urls: list[str]) -> None:
    # The listener is the first user of a new cluster client (a gateway starting): it must
    # learn the slot map before subscribing, not die on an empty one.
    listening = connect_redis(cluster_urls[0], timeout_s=2.0, cluster=True)
    other = connect_redis(cluster_urls[0], timeout_s=2.0, cluster=True)
    waiter = RedisSeatStore(listening, seats=1, prefix="twlisten:", poll_min_s=30.0)
    holder = RedisSeatStore(other, seats=1, prefix="twlisten:")
    async with waiter.running():
        first, second = Ticket("a", 1.0, 10.0), Ticket("b", 1.0, 10.0)
        assert await holder.acquire(first) == GRANTED
        assert await waiter.acquire(second) == QUEUED
        await anyio.sleep(0.5)  # the listener subscribes
        await holder.release(first, 10.0)
        with anyio.fail_after(20):  # woken by the notice: its first poll is 30 s away
            await waiter.wait(second)
        assert second.granted
        await waiter.release(second, 10.0)
    await listening.aclose()
    await other.aclose()


def _without_fast_path(script: str) -> str:
    """The pool's script with its usual-seat-request block taken out: every acquire takes
    the general path."""
    start = script.index("-- The usual seat request")
    end = script.index("\nlocal function num(v)")
    return script[:start] + script[end:]


async def _pool_state(client: Any, base: str) -> dict[str, Any]:
    """Every book of a pool but the times (lease expiries, idle times) and ticket prefixes."""
    sys_ = await client.hgetall(base + ":sys")
    return {
        "ctr": await client.hgetall(base + ":ctr"),
        "held": await client.hgetall(base + ":held"),
        "w": await client.hgetall(base + ":w"),
        # Ticket ids carry each store's own random prefix: by sequence number.
        "lease": {
            k.rsplit(b":", 1)[1]: v for k, v in (await client.hgetall(base + ":lease")).items()
        },
        "sys": {k: v for k, v in sys_.items() if k not in (b"lts", b"lvl")},
        "seats": sorted(t.rsplit(b":", 1)[1] for t in await client.zrange(base + ":seats", 0, -1)),
        "left": sorted(await client.zrange(base + ":left", 0, -1)),
        "qn": await client.hgetall(base + ":qn"),
    }


async def test_the_usual_seat_request_writes_what_the_general_path_writes(
    redis_url: str, redis_prefix: str
) -> None:
    # The same requests against two pools, one running the script as it is, one without its
    # fast path: three tenants of different weights on three seats with headroom, 1 to 4
    # requests at once (most granted at once, some queued), then released; every book ends
    # the same, and so do the answers.
    from tenantware.admission import redis as admission_redis
    from tenantware.backends.redis_support import register_script

    async with connect_redis(redis_url, timeout_s=5.0) as client:
        fast = RedisSeatStore(client, seats=3, prefix=redis_prefix + "fast:", headroom=1)
        general = RedisSeatStore(client, seats=3, prefix=redis_prefix + "general:", headroom=1)
        general._script = register_script(client, _without_fast_path(admission_redis._SCRIPT))
        answers: dict[str, list[int]] = {"fast": [], "general": []}
        books: dict[str, list[dict[str, Any]]] = {"fast": [], "general": []}
        names = [("acme", 1.0), ("beta", 2.0), ("gamma", 0.5)]
        for name, pool in (("fast", fast), ("general", general)):
            step = 0
            for round_ in range(12):  # 1 to 4 requests at once, then every one released
                tickets: list[Ticket] = []
                for k in range(1 + round_ % 4):
                    tenant, weight = names[(round_ + k) % 3]
                    ticket = Ticket(tenant, weight, 10.0 + step, tokens=20.0)
                    step += 1
                    answers[name].append(await pool.acquire(ticket))
                    tickets.append(ticket)
                books[name].append(await _pool_state(client, pool.keys[0]))
                while tickets:  # a release grants the next queued ticket
                    done = next(t for t in tickets if t.granted)
                    tickets.remove(done)
                    await pool.release(done, 8.0 + step, 16.0)
        assert answers["fast"] == answers["general"]
        assert GRANTED in answers["fast"]
        assert QUEUED in answers["fast"]
        fast_books = await _pool_state(client, fast.keys[0])
        general_books = await _pool_state(client, general.keys[0])
        assert fast_books["ctr"], fast_books
        assert fast_books == general_books
        assert books["fast"] == books["general"]  # after each round's requests too


@pytest.mark.parametrize("hold", [0.0, 60.0, 1.0])
async def test_the_usual_seat_request_keeps_the_headroom_as_the_general_path(
    redis_url: str, redis_prefix: str, hold: float
) -> None:
    # Two tenants active (beta lingering after its release), acme at its seat share asks for
    # the pool's last seat, the headroom: refused (queued) on both paths, unless its request
    # is expected to end within short_s (2 s here: hold 1 s), which may take any free seat.
    from tenantware.admission import redis as admission_redis
    from tenantware.backends.redis_support import register_script

    async with connect_redis(redis_url, timeout_s=5.0) as client:
        fast = RedisSeatStore(
            client, seats=3, prefix=redis_prefix + "fast:", headroom=1, short_s=2.0
        )
        general = RedisSeatStore(
            client, seats=3, prefix=redis_prefix + "general:", headroom=1, short_s=2.0
        )
        general._script = register_script(client, _without_fast_path(admission_redis._SCRIPT))
        answers: dict[str, list[int]] = {}
        for name, pool in (("fast", fast), ("general", general)):
            beta = Ticket("beta", 1.0, 10.0, tokens=20.0)
            assert await pool.acquire(beta) == GRANTED
            await pool.release(beta, 10.0, 20.0)
            answers[name] = [
                await pool.acquire(Ticket("acme", 1.0, 10.0, tokens=20.0, hold=hold))
                for _ in range(3)
            ]
            assert await _pool_state(client, pool.keys[0]) == await _pool_state(
                client, fast.keys[0]
            )
        expected = GRANTED if hold == 1.0 else QUEUED
        assert answers["fast"] == answers["general"] == [GRANTED, GRANTED, expected]
