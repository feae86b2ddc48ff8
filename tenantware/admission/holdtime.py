"""How long a request will hold its seat, guessed before it starts.

The scheduler lends protected seats (the headroom, unused reserved seats) only to requests
expected to end soon, so that the tenant they are kept for waits at most that long. The guess
is an upper bound on purpose: ``max_tokens`` (the most the request may produce) times the
pool's observed seconds per output token, plus its observed time to the first byte. An
unknown pool (nothing observed yet) gives 0, which the scheduler counts as a long request.
"""

from __future__ import annotations

__all__ = ["HoldTimes"]

#: Weight of the newest observation in the moving averages.
_ALPHA = 0.1


class HoldTimes:
    """Per pool: moving averages of the time to the first byte and of seconds per token."""

    __slots__ = ("_first", "_per_token")

    def __init__(self) -> None:
        self._first: dict[str, float] = {}
        self._per_token: dict[str, float] = {}

    def estimate(self, pool: str, max_output: int) -> float:
        """Expected seconds of a request allowed ``max_output`` tokens (0: unknown)."""
        per_token = self._per_token.get(pool)
        if per_token is None:
            return 0.0
        return self._first.get(pool, 0.0) + per_token * max_output

    def observe(self, pool: str, first_s: float, total_s: float, output_tokens: int) -> None:
        """One finished request: seconds to its first byte, seconds in all, tokens produced."""
        if output_tokens <= 0 or total_s <= 0.0:
            return
        first_s = min(max(first_s, 0.0), total_s)
        per_token = (total_s - first_s) / output_tokens
        old = self._per_token.get(pool)
        self._per_token[pool] = per_token if old is None else old + _ALPHA * (per_token - old)
        old = self._first.get(pool)
        self._first[pool] = first_s if old is None else old + _ALPHA * (first_s - old)
