"""Outage evidence for redis-py clients: silence while calls are outstanding, not slowness.

The pipelined connection (``multiplex.py``) sees reply bytes; a redis-py client reads its
replies inside its pooled connections, so ``connect_redis`` gives those connections a
``read_response`` that reports every reply to the client's watch (``heard``): a call fails
once no reply at all reached the client for the bound while calls were outstanding, however
long one call waited behind other clients' scripts. Every reply counts, not only a finished
call's: one call may be several round trips (a new connection's handshake, a script
reloaded after NOSCRIPT, a cluster redirect), and on a CPU-starved host those alone can
outlast the bound while Redis answers each of them.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import anyio
from redis import exceptions as redis_exceptions
from redis.exceptions import RedisError

from tenantware.backends.errors import StoreUnavailable

__all__ = ["ProgressWatch", "watch", "watch_of"]

T = TypeVar("T")
#: Loop turns a silence must last past the bound (replies read resume their calls).
_CONFIRM_TURNS = 3
#: A check later than this share of the bound means this loop, not Redis, was busy.
_LATE = 0.25


class ProgressWatch:
    """When a redis-py client last got an answer, and the bound on its calls' silence.

    ``run(call)`` lets ``call`` wait as long as the client keeps getting replies (the store
    is busy, not dead) and fails it with ``StoreUnavailable`` once none has come for
    ``bound_s`` while calls were outstanding. Before failing, the silence must
    last a few more turns of this event loop, so that its own lag (replies received but not
    yet read, connects not yet made) is not taken for Redis's. With ``max_in_flight``, calls
    past that many wait for a turn (not sent, so not counted); a stall declared meanwhile
    fails them at once.
    """

    __slots__ = (
        "_turns",
        "answered",
        "bound_s",
        "in_flight",
        "last_reply",
        "max_in_flight",
        "stalls",
    )

    def __init__(self, bound_s: float, *, max_in_flight: int | None = None) -> None:
        self.bound_s = bound_s
        self.max_in_flight = max_in_flight
        #: Some call has been answered (the client is connected and knows its nodes).
        self.answered = False
        self.in_flight = 0
        self.last_reply = 0.0
        #: Stalls declared so far (a waiting call that sees it change gives up).
        self.stalls = 0
        self._turns: asyncio.Semaphore | None = None

    def heard(self) -> None:
        """A reply reached one of the client's connections (any reply: Redis is answering)."""
        self.last_reply = asyncio.get_running_loop().time()

    async def run(self, call: Coroutine[Any, Any, T]) -> T:
        if self.max_in_flight is None:
            return await self._run(call)
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.max_in_flight)
        stalls = self.stalls
        try:
            async with self._turns:
                if self.stalls != stalls:
                    raise StoreUnavailable("Redis stalled while this call waited for a turn")
                return await self._run(call)
        finally:
            call.close()  # not awaited when it gave up before its turn

    async def _run(self, call: Awaitable[T]) -> T:
        if self.bound_s == math.inf or not self.answered:
            # Until a first answer the client may still be discovering a cluster (several
            # round trips inside one call): redis-py's own timeouts bound that call.
            try:
                result = await call
            except RedisError as exc:
                raise StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc
            self.answered = True
            return result
        loop = asyncio.get_running_loop()
        if not self.in_flight:
            self.last_reply = loop.time()  # silence counts from the first outstanding call
        self.in_flight += 1
        try:
            # An anyio scope, not ``asyncio.timeout``: it cancels the call again at every turn
            # until the call has left, where one cancellation can be lost (Python 3.11's
            # ``asyncio.wait_for``, which redis-py sends with, returns a result that came in
            # the same turn as the cancellation, and the call then waits for its reply).
            with anyio.CancelScope() as scope:
                watched = _Watched(scope)
                due = self.last_reply + self.bound_s
                watched.handle = loop.call_at(due, self._check, watched, due)
                try:
                    result = await call
                except RedisError as exc:
                    if isinstance(exc, redis_exceptions.ResponseError):
                        self.last_reply = loop.time()  # an answer, if an unwelcome one
                    raise StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc
                finally:
                    watched.done = True
                    watched.handle.cancel()
            if scope.cancelled_caught:
                raise StoreUnavailable(
                    f"Redis answered nothing for {self.bound_s:g} s with {self.in_flight} calls"
                    " outstanding"
                )
        finally:
            self.in_flight -= 1
        self.last_reply = loop.time()
        return result

    def _check(self, watched: _Watched, due: float, hops: int = 0) -> None:
        """Silence is Redis's only if this loop was free to notice an answer: a check that
        runs late (the loop was busy, say parsing a burst) gives Redis a full bound from now,
        and the last ``_CONFIRM_TURNS`` turns let replies already read resume their calls."""
        if watched.done:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        silent_until = self.last_reply + self.bound_s
        if now < silent_until:  # an answer came meanwhile: wait for the next silence
            watched.handle = loop.call_at(silent_until, self._check, watched, silent_until)
        elif not hops and not watched.extended and now - due > self.bound_s * _LATE:
            watched.extended = True  # once: a loop late at every check still ends the wait
            later = now + self.bound_s
            watched.handle = loop.call_at(later, self._check, watched, later)
        elif hops < _CONFIRM_TURNS:
            watched.handle = loop.call_soon(self._check, watched, due, hops + 1)
        else:
            self.stalls += 1
            watched.scope.cancel()


class _Watched:
    """One call under watch: its cancel scope and the handle of its next check."""

    __slots__ = ("done", "extended", "handle", "scope")

    def __init__(self, scope: anyio.CancelScope) -> None:
        self.scope = scope
        self.done = False
        self.extended = False
        self.handle: asyncio.Handle | None = None


#: The progress watch of each client made by ``connect_redis``.
_WATCHES: weakref.WeakKeyDictionary[Any, ProgressWatch] = weakref.WeakKeyDictionary()


def watch(client: object, watch: ProgressWatch) -> None:
    """Give ``client`` its progress watch (``connect_redis`` does, for each client it makes)."""
    _WATCHES[client] = watch


def watch_of(client: object) -> ProgressWatch:
    """The progress watch of ``client``; a client not made by ``connect_redis`` keeps its own
    timeouts (its calls are only translated)."""
    watch = _WATCHES.get(client)
    if watch is None:
        watch = _WATCHES[client] = ProgressWatch(math.inf)
    return watch
