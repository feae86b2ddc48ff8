"""The one set of "store unavailable" exceptions every layer's failure policy catches.

Backend errors are translated into ``StoreUnavailable`` where the backend is called
(``backends/redis_support.py`` for redis-py, ``backends/multiplex.py`` for the pipelined
connection), so no layer imports a backend library to know what an outage looks like.
"""

from __future__ import annotations

__all__ = ["STORE_UNAVAILABLE", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The shared store did not answer: unreachable, stalled, or it refused the call."""


#: What a failure policy catches around a store call: the translated backend errors and the
#: OS and deadline errors a call can also end with.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (StoreUnavailable, OSError, TimeoutError)
