"""The fixed logarithmic latency buckets that the roll-ups count seconds into.

A month of a busy tenant is too many records to sort for a percentile in well under a second,
so the PostgreSQL ledger keeps, per day, how many latencies fell into each bucket and reads a
report's p50/p99 from those counts. Bucket 0 holds ``[0, FLOOR_S)``; bucket ``i >= 1`` holds
``[FLOOR_S * RATIO**(i-1), FLOOR_S * RATIO**i)``. A percentile is reported as its bucket's
geometric middle, so it is within ``RELATIVE_ERROR`` of the nearest-rank value (above
``FLOOR_S``; below it, within ``FLOOR_S`` absolute). Every ledger applies the same rule
(``coarsen``), so reports agree across ledgers.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = [
    "BUCKETS",
    "FLOOR_S",
    "RATIO",
    "RELATIVE_ERROR",
    "bucket_index",
    "bucketed",
    "representative",
    "sql_bucket_index",
]

FLOOR_S: Final = 0.001
RATIO: Final = 1.1
#: Buckets in all; the last one also holds everything above ``FLOOR_S * RATIO**(BUCKETS-2)``
#: (about two days).
BUCKETS: Final = 200
#: ``sqrt(RATIO) - 1``: a reported percentile is at most this far from the exact one.
RELATIVE_ERROR: Final = math.sqrt(RATIO) - 1
_LOG_RATIO: Final = math.log(RATIO)


def bucket_index(seconds: float) -> int:
    """The bucket holding ``seconds`` (the same arithmetic as ``sql_bucket_index``)."""
    if not seconds >= FLOOR_S:
        return 0
    return min(BUCKETS - 1, 1 + math.floor(math.log(seconds / FLOOR_S) / _LOG_RATIO))


def representative(index: int) -> float:
    """What a percentile in bucket ``index`` is reported as: the bucket's geometric middle."""
    if index <= 0:
        return FLOOR_S / 2
    return float(FLOOR_S * RATIO ** (index - 0.5))


def bucketed(seconds: float | None) -> float | None:
    return None if seconds is None else representative(bucket_index(seconds))


def sql_bucket_index(column: str) -> str:
    """``bucket_index(column)`` in PostgreSQL (``ln`` of a double is C's ``log``, as in
    Python, so both put a value in the same bucket)."""
    return (
        f"CASE WHEN {column} >= {FLOOR_S!r} THEN least({BUCKETS - 1}, 1 + "
        f"floor(ln({column} / {FLOOR_S!r}) / ln({RATIO!r}::double precision))::integer) "
        "ELSE 0 END"
    )
