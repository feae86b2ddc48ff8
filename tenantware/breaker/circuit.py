"""One circuit's state machine, in memory, with an injectable clock.

CLOSED counts outcomes in a bucketed sliding window and opens on N consecutive failures or on
a failure / slow-call rate once the window holds enough calls. OPEN rejects until its wait
ends; the wait doubles with each re-opening (capped). HALF_OPEN lets a fixed number of probes
through: one failing probe re-opens, all succeeding close. A 429 never changes the state: it
only cools the circuit for the upstream's ``retry-after``. ``lua/breaker.lua`` is the same
machine for Redis; one test suite runs against both.
"""

from __future__ import annotations

from typing import Final

from tenantware.config import CircuitSettings

__all__ = [
    "BUCKETS",
    "CLOSED",
    "FAILURE",
    "HALF_OPEN",
    "LIMITED",
    "OPEN",
    "PASS",
    "PROBE",
    "PROBE_BUSY_WAIT_S",
    "RELEASE",
    "SLOW",
    "STATE_NAMES",
    "SUCCESS",
    "TIMEOUT",
    "Circuit",
    "CircuitPolicy",
]

#: States (the values of the ``tenantware_breaker_state`` gauge).
CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
STATE_NAMES: Final = ("closed", "half_open", "open")

#: Outcomes of one call.
SUCCESS: Final = 0
SLOW: Final = 1
FAILURE: Final = 2
#: A timed-out call: a failure, and a slow call for the slow-call rate.
TIMEOUT: Final = 3
#: Upstream 429: cool down, neither success nor failure.
LIMITED: Final = 4
#: A probe slot taken but not used (the request went elsewhere): give it back.
RELEASE: Final = 5

#: ``gate`` results besides a positive wait: traffic may go / a probe slot may be free.
PASS: Final = 0.0
PROBE: Final = -1.0
#: What a half-open circuit whose probes are all in flight tells callers to wait.
PROBE_BUSY_WAIT_S: Final = 1.0
#: Buckets of the sliding window (each ``window_s / BUCKETS`` long).
BUCKETS: Final = 10


class CircuitPolicy:
    """``CircuitSettings`` turned into the numbers the machine compares against, once."""

    __slots__ = (
        "bucket_s",
        "consecutive",
        "max_wait_s",
        "minimum_calls",
        "probes",
        "rate_percent",
        "slow_call_s",
        "slow_rate_percent",
        "wait_s",
        "window_s",
    )

    def __init__(self, settings: CircuitSettings) -> None:
        self.consecutive = settings.consecutive_failures
        self.rate_percent = settings.failure_rate_percent
        self.slow_rate_percent = settings.slow_call_rate_percent
        self.slow_call_s = settings.slow_call_s
        self.window_s = settings.window_s
        self.bucket_s = settings.window_s / BUCKETS
        self.minimum_calls = settings.minimum_calls
        self.wait_s = settings.open_wait_s
        self.max_wait_s = max(settings.max_open_wait_s, settings.open_wait_s)
        self.probes = settings.half_open_probes

    def wait_for(self, trips: int) -> float:
        """Open period after the ``trips``-th opening in a row: doubling, capped."""
        return float(min(self.wait_s * 2 ** min(trips - 1, 30), self.max_wait_s))

    def trips(self, calls: int, fails: int, slows: int, consecutive: int) -> bool:
        """Whether these window counts open a closed circuit."""
        if consecutive >= self.consecutive:
            return True
        if calls < self.minimum_calls:
            return False
        return fails * 100 >= self.rate_percent * calls or slows * 100 >= (
            self.slow_rate_percent * calls
        )


class Circuit:
    """State of one circuit; every method takes ``now`` (seconds, any monotonic origin)."""

    __slots__ = (
        "calls",
        "closed_at",
        "consecutive",
        "cool_until",
        "fails",
        "half_open_at",
        "last_bucket",
        "open_until",
        "policy",
        "probe_ok",
        "probes_left",
        "slots",
        "slows",
        "state",
        "trips",
    )

    def __init__(self, policy: CircuitPolicy) -> None:
        self.policy = policy
        self.state = CLOSED
        self.consecutive = 0
        self.trips = 0
        self.open_until = 0.0
        self.closed_at = 0.0
        self.probes_left = 0
        self.probe_ok = 0
        self.half_open_at = 0.0
        self.cool_until = 0.0
        self.last_bucket = 0
        #: Per bucket: [calls, failures, slow calls]; plus running totals.
        self.slots = [[0, 0, 0] for _ in range(BUCKETS)]
        self.calls = self.fails = self.slows = 0

    def gate(self, now: float) -> float:
        """``PASS``, ``PROBE`` (a probe may go) or the seconds until traffic may go again."""
        cool = self.cool_until - now if self.cool_until > now else 0.0
        state = self.state
        if state == CLOSED:
            return cool if cool > 0 else PASS
        if state == OPEN and now < self.open_until:
            return max(cool, self.open_until - now)
        if cool > 0:
            return cool
        if state == HALF_OPEN and self.probes_left <= 0 and not self._probes_lost(now):
            return PROBE_BUSY_WAIT_S
        return PROBE

    def _probes_lost(self, now: float) -> bool:
        # Probes unanswered for a whole open period (their process died): probe afresh.
        return now - self.half_open_at >= self.policy.wait_for(self.trips)

    def take_probe(self, now: float) -> bool:
        """Take one probe slot (OPEN past its wait turns HALF_OPEN first)."""
        if (self.state == OPEN and now >= self.open_until) or (
            self.state == HALF_OPEN and self.probes_left <= 0 and self._probes_lost(now)
        ):
            self.state = HALF_OPEN
            self.probes_left = self.policy.probes
            self.probe_ok = 0
            self.half_open_at = now
        if self.state == HALF_OPEN and self.probes_left > 0 and now >= self.cool_until:
            self.probes_left -= 1
            return True
        return False

    def record(self, now: float, outcome: int, *, probe: bool = False, cool_s: float = 0.0) -> None:
        """Account for one call's outcome."""
        if outcome == LIMITED:
            self.cool_until = max(self.cool_until, now + cool_s)
        if probe and self.state == HALF_OPEN:
            if outcome in (FAILURE, TIMEOUT):
                self._open(now)
            elif outcome in (LIMITED, RELEASE):
                self.probes_left += 1
            else:
                self.probe_ok += 1
                if self.probe_ok >= self.policy.probes:
                    self._close(now)
            return
        if self.state != CLOSED or outcome >= LIMITED:
            # Answers to calls admitted before the circuit opened say nothing new.
            return
        policy = self.policy
        bucket = int(now // policy.bucket_s)
        if bucket != self.last_bucket:
            self._advance(bucket)
        slot = self.slots[bucket % BUCKETS]
        slot[0] += 1
        self.calls += 1
        if outcome in (FAILURE, TIMEOUT):
            slot[1] += 1
            self.fails += 1
            self.consecutive += 1
            if outcome == TIMEOUT:
                slot[2] += 1
                self.slows += 1
            if self.consecutive >= policy.consecutive:
                self._open(now)
                return
        else:
            self.consecutive = 0
            if outcome == SLOW:
                slot[2] += 1
                self.slows += 1
        if self.calls >= policy.minimum_calls and policy.trips(
            self.calls, self.fails, self.slows, self.consecutive
        ):
            self._open(now)

    def remaining(self, now: float) -> float:
        """Seconds until the open period ends (0 when not open)."""
        return max(0.0, self.open_until - now) if self.state == OPEN else 0.0

    def _advance(self, bucket: int) -> None:
        """Move the window to ``bucket``, emptying the buckets that slid out."""
        last = self.last_bucket
        if bucket - last >= BUCKETS or bucket < last:
            self._clear_window()
        else:
            for index in range(last + 1, bucket + 1):
                old = self.slots[index % BUCKETS]
                self.calls -= old[0]
                self.fails -= old[1]
                self.slows -= old[2]
                old[0] = old[1] = old[2] = 0
        self.last_bucket = bucket

    def _clear_window(self) -> None:
        for slot in self.slots:
            slot[0] = slot[1] = slot[2] = 0
        self.calls = self.fails = self.slows = 0

    def _open(self, now: float) -> None:
        policy = self.policy
        if self.state == CLOSED and now - self.closed_at > policy.max_wait_s:
            # Healthy for longer than the longest wait: start the backoff over.
            self.trips = 0
        self.trips += 1
        self.state = OPEN
        self.open_until = now + policy.wait_for(self.trips)
        self.consecutive = 0
        self.probes_left = 0
        self._clear_window()

    def _close(self, now: float) -> None:
        self.state = CLOSED
        self.closed_at = now
        self.consecutive = 0
        self._clear_window()
