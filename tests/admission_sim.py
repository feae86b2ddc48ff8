"""A deterministic discrete-event simulation of a seat pool driven by the real ``FairCore``.

Upstream service time is a function of the output tokens; arrivals are closed-loop
("backlogged": keep N requests outstanding) or open-loop at a fixed rate with seeded jitter.
No wall clock: exact, repeatable, and a minute of traffic simulates in well under a second.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from tenantware.admission.core import GRANTED, QUEUE_FULL, FairCore, Ticket

OUTPUT_WEIGHT = 2.0


@dataclass
class SimTenant:
    name: str
    weight: float
    band: int = 1
    reserved: int = 0
    cap: int = 0
    #: Closed loop: keep this many requests outstanding (0: open loop at ``rate``).
    outstanding: int = 0
    #: Open loop: requests per second.
    rate: float = 0.0
    start: float = 0.0
    stop: float = math.inf
    prompt: int = 200
    #: Output tokens drawn uniformly from this range; the estimate is its midpoint.
    output: tuple[int, int] = (50, 250)
    #: Actual output = estimate x this (misprediction).
    actual_factor: float = 1.0
    #: Closed loop: seconds between a completion and the client's next request.
    think: float = 0.0


@dataclass
class Record:
    tenant: str
    arrive: float
    dispatch: float
    finish: float
    cost: float  # actual weighted cost
    estimate: float
    #: Whether the tenant held fewer seats than its seat share when the request arrived.
    below_share: bool = False


@dataclass
class SimResult:
    records: list[Record] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    #: (time, {tenant: charged service / weight}) sampled at every event.
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def served(self, tenant: str, t0: float, t1: float) -> float:
        """Actual weighted tokens of requests of ``tenant`` completed in [t0, t1)."""
        return sum(r.cost for r in self.records if r.tenant == tenant and t0 <= r.finish < t1)

    def e2e(self, tenant: str, t0: float = 0.0) -> list[float]:
        return sorted(
            r.finish - r.arrive for r in self.records if r.tenant == tenant and r.arrive >= t0
        )


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def jain(shares: dict[str, float], weights: dict[str, float]) -> float:
    """Weighted Jain index of served amounts against weight-proportional fair shares."""
    xs = [shares[name] / weights[name] for name in shares]
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def service_time(output_tokens: int) -> float:
    """Upstream time: 50 ms to first token, then 1 ms per output token."""
    return 0.05 + 0.001 * output_tokens


def simulate(
    tenants: list[SimTenant],
    *,
    seats: int,
    until: float,
    lifting: bool = True,
    fifo: bool = False,
    max_queue: int = 256,
    band_shares: tuple[float, float, float] = (16.0, 4.0, 1.0),
    headroom: int = 0,
    short_s: float = 0.0,
    seed: int = 7,
    sample: bool = False,
    service: Callable[[int], float] = service_time,
) -> SimResult:
    """Run the pool until ``until`` simulated seconds; ``fifo`` makes one shared queue."""
    rng = random.Random(seed)
    core = FairCore(
        seats,
        band_shares=band_shares,
        max_queue=max_queue,
        lifting=lifting,
        headroom=headroom,
        short_s=short_s,
    )
    result = SimResult(rejected={t.name: 0 for t in tenants})
    events: list[tuple[float, int, str, object]] = []
    seq = 0
    charged = {t.name: 0.0 for t in tenants}
    by_name = {t.name: t for t in tenants}

    def push(at: float, kind: str, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, payload))

    def arrive(tenant: SimTenant, now: float) -> None:
        low, high = tenant.output
        estimate_out = (low + high) // 2
        actual_out = max(1, round(rng.randint(low, high) * tenant.actual_factor))
        estimate = tenant.prompt + OUTPUT_WEIGHT * estimate_out
        ticket = Ticket(
            "fifo" if fifo else tenant.name,
            1.0 if fifo else tenant.weight,
            estimate,
            band=1 if fifo else tenant.band,
            reserved=tenant.reserved,
            cap=tenant.cap,
            # As the gateway estimates it: from max_tokens (the range's top) and the speed.
            hold=service(high),
        )
        state = core.tenants.get(ticket.tenant)
        held, counted = (state.held, state.weight) if state else (0, 0.0)
        # Seen from outside the core (lingering tenants not yet expired: a larger weight sum,
        # so never "below" where the core would not say so).
        total = core.active_weight + ticket.weight - counted
        below = held * total < seats * ticket.weight
        ticket.handle = [tenant, now, actual_out, 0.0, below]
        status, granted = core.submit(ticket, now)
        if status == QUEUE_FULL:
            result.rejected[tenant.name] += 1
            if tenant.outstanding:
                push(now + 0.05, "arrive", tenant)
            return
        if status == GRANTED and ticket not in granted:
            granted = [ticket, *granted]
        start(granted, now)

    def start(granted: list[Ticket], now: float) -> None:
        for ticket in granted:
            tenant, _arrived, actual_out, _, _ = ticket.handle
            ticket.handle[3] = now
            charged[tenant.name] += ticket.cost / tenant.weight
            push(now + service(actual_out), "finish", ticket)

    for tenant in tenants:
        if tenant.outstanding:
            for _ in range(tenant.outstanding):
                push(tenant.start, "arrive", tenant)
        elif tenant.rate:
            push(tenant.start + rng.random() / tenant.rate, "arrive", tenant)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now >= until:
            break
        if kind == "arrive":
            tenant = payload  # type: ignore[assignment]
            assert isinstance(tenant, SimTenant)
            if now >= tenant.stop:
                continue
            arrive(tenant, now)
            if tenant.rate:
                push(now + rng.expovariate(tenant.rate), "arrive", tenant)
        else:
            ticket = payload
            assert isinstance(ticket, Ticket)
            tenant, arrived, actual_out, dispatched, below = ticket.handle
            actual = tenant.prompt + OUTPUT_WEIGHT * actual_out
            charged[tenant.name] += (actual - ticket.cost) / tenant.weight
            result.records.append(
                Record(tenant.name, arrived, dispatched, now, actual, ticket.cost, below)
            )
            start(core.release(ticket, actual if not fifo else ticket.cost, None, now), now)
            if tenant.outstanding and now < tenant.stop:
                if tenant.think:
                    push(now + tenant.think, "arrive", tenant)
                else:
                    arrive(tenant, now)
        if sample:
            result.samples.append((now, dict(charged)))
    del by_name
    return result
