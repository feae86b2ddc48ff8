"""The stores of every layer from one URL, and the failure policies they share."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest

from tenantware import metrics
from tenantware.admission.core import GRANTED, QUEUED, Ticket
from tenantware.admission.pools import pool_specs
from tenantware.admission.store import UNAVAILABLE
from tenantware.backends.failover import StoreHealth
from tenantware.config import AdmissionSettings
from tenantware.quota.failover import FailoverQuotaStore
from tenantware.stores import open_stores
from tests.servers import find_free_port

pytestmark = pytest.mark.anyio


def _failures(layer: str, policy: str) -> float:
    labels = {"layer": layer, "policy": policy}
    return metrics.REGISTRY.get_sample_value("tenantware_store_failures_total", labels) or 0.0


def test_an_unknown_scheme_is_refused_with_the_ones_understood() -> None:
    with pytest.raises(ValueError, match=r"'postgresql'.*memory://.*redis\+cluster://"):
        open_stores("postgresql://127.0.0.1/test")


def test_memory_stores_keep_state_in_the_process() -> None:
    stores = open_stores("memory://", replicas=2)
    assert not stores.remote
    assert stores.redis is None
    quota = stores.quota_store()
    assert (quota.remote, quota.yields) == (False, False)
    assert stores.breaker_store().remote is False
    spec = pool_specs(AdmissionSettings(seats=8))["*"]
    seats = stores.seat_store(spec)
    assert (seats.remote, seats.yields) == (False, False)


async def test_redis_stores_declare_what_they_need() -> None:
    stores = open_stores(f"redis://127.0.0.1:{find_free_port()}/0")  # nothing is connected
    try:
        quota = stores.quota_store()
        assert isinstance(quota, FailoverQuotaStore)
        assert (quota.remote, quota.yields, quota.single_node) == (True, True, True)
        assert stores.breaker_store().remote is True
        seats = stores.seat_store(pool_specs(AdmissionSettings(seats=8))["*"])
        assert (seats.remote, seats.yields) == (True, True)
    finally:
        await stores.aclose()


async def test_local_admission_keeps_a_pool_with_this_process_share() -> None:
    # Redis is down: each of 2 replicas admits 2 of the pool's 4 seats, the third waits for a
    # release, and every decision taken without Redis is counted.
    stores = open_stores(f"redis://127.0.0.1:{find_free_port()}/0", on_failure="local", replicas=2)
    store = stores.seat_store(pool_specs(AdmissionSettings(seats=4))["*"])
    before = _failures("admission", "local")
    try:
        tickets = [Ticket("acme", 1.0, 10.0) for _ in range(3)]
        statuses = [await store.acquire(ticket) for ticket in tickets]
        assert statuses == [GRANTED, GRANTED, QUEUED]
        await store.release(tickets[0], 10.0, 10.0)
        with anyio.fail_after(5):
            await store.wait(tickets[2])
        assert tickets[2].granted
        # Two seats held again: the next one waits too.
        assert await store.acquire(Ticket("acme", 1.0, 10.0)) == QUEUED
    finally:
        await stores.aclose()
    assert _failures("admission", "local") == before + 4


async def test_closed_admission_answers_unavailable() -> None:
    stores = open_stores(f"redis://127.0.0.1:{find_free_port()}/0", on_failure="closed")
    store = stores.seat_store(pool_specs(AdmissionSettings(seats=4))["*"])
    before = _failures("admission", "closed")
    try:
        assert await store.acquire(Ticket("acme", 1.0, 10.0)) == UNAVAILABLE
    finally:
        await stores.aclose()
    assert _failures("admission", "closed") == before + 1


def test_an_outage_is_probed_by_one_call_per_interval() -> None:
    now = [100.0]
    health = StoreHealth(probe_interval_s=0.25, bound_s=0.5, clock=lambda: now[0])
    assert health.available  # up: every call goes to the store
    assert health.failed()  # the first failure starts the outage...
    assert not health.failed()  # ...once
    assert [health.available for _ in range(3)] == [False] * 3
    now[0] += 0.25
    assert [health.available for _ in range(3)] == [True, False, False]  # one probe
    health.failed()  # it failed: the next one after another interval
    now[0] += 0.2
    assert not health.available
    now[0] += 0.05
    assert health.available
    assert health.succeeded()  # answered: every call goes to the store again
    assert [health.available for _ in range(3)] == [True] * 3


def test_a_probe_that_never_reports_is_replaced() -> None:
    now = [0.0]
    health = StoreHealth(probe_interval_s=0.25, bound_s=0.5, clock=lambda: now[0])
    health.failed()
    now[0] += 0.25
    assert health.available  # this probe's caller is cancelled: it never reports
    now[0] += 0.7
    assert not health.available
    now[0] += 0.1  # interval + bound after it went
    assert health.available


def test_a_gateway_in_memory_never_loads_the_redis_package() -> None:
    code = (
        "import sys, tenantware\n"
        "gateway = tenantware.Gateway(tenantware.parse_config({}))\n"
        "gateway.middleware()\n"
        "assert 'redis' not in sys.modules, sorted(m for m in sys.modules if 'redis' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
