"""Shared Redis plumbing for the Redis backends: clients, scripts, error translation.

This module (with ``multiplex.py``) is where the ``redis`` package is imported: the stores of
the memory backend, and ``import tenantware``, never load it. redis-py's errors become
``StoreUnavailable`` here, the one exception the layers' failure policies catch.
Scripts are registered with ``register_script``: EVALSHA, reloaded on NOSCRIPT (after a
restart or a SCRIPT FLUSH).

Outage evidence for redis-py clients (Redis Cluster, TLS) follows the pipelined connection's
rule: a call is failed when no call of the same client has been answered for ``timeout_s``
while calls are outstanding (``ProgressWatch``), never because it alone waited long behind
other clients' scripts. redis-py's own socket timeout stays as a last resort, well above.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tenantware.backends.errors import StoreUnavailable
from tenantware.backends.keys import tenant_key
from tenantware.backends.multiplex import MultiplexedRedis, MultiplexedScript, multiplexable

__all__ = [
    "ProgressWatch",
    "RedisClient",
    "ScriptHost",
    "bounds_calls",
    "connect_redis",
    "connect_scripts",
    "redis_errors",
    "register_script",
    "single_node",
    "tenant_key",
    "watch_of",
]

T = TypeVar("T")
#: redis-py's socket timeout, in bounds: only for a call the progress rule cannot reach.
_SOCKET_TIMEOUT_FACTOR = 20
_MIN_SOCKET_TIMEOUT_S = 2.0
#: Loop turns a silence must last past the bound (replies read resume their calls).
_CONFIRM_TURNS = 3
#: A check later than this share of the bound means this loop, not Redis, was busy.
_LATE = 0.25
#: Script calls of one redis-py client in flight at once (one connection each).
_SCRIPTS_IN_FLIGHT = 16

#: Either client: both run scripts and commands the same way for single-slot work.
RedisClient = aioredis.Redis | RedisCluster
#: What runs the hot-path scripts: the pipelined connection, or a redis-py client.
ScriptHost = MultiplexedRedis | RedisClient


def connect_redis(
    url: str, *, timeout_s: float = 0.05, cluster: bool | None = None, **options: Any
) -> RedisClient:
    """A pooled asyncio client; ``redis+cluster://`` (or ``cluster=True``) for a cluster.

    ``timeout_s`` is the outage bound: a script call fails once Redis has answered none of
    this client's calls for that long (``ProgressWatch``), so a stopped Redis costs each
    request at most about that long before the caller's failure policy decides.
    """
    is_cluster = cluster if cluster is not None else url.startswith("redis+cluster://")
    if url.startswith("redis+cluster://"):
        url = "redis://" + url[len("redis+cluster://") :]
    # A connect or read slower than ``timeout_s`` on a loaded host is not an outage: the
    # script calls are bounded by the progress rule; these only catch what it cannot reach.
    last_resort = max(timeout_s * _SOCKET_TIMEOUT_FACTOR, _MIN_SOCKET_TIMEOUT_S)
    common: dict[str, Any] = {
        "socket_timeout": last_resort,
        "socket_connect_timeout": last_resort,
        **options,
    }
    client: RedisClient
    if is_cluster:
        client = RedisCluster.from_url(url, **common)
    else:
        client = aioredis.Redis.from_url(url, **common)
    # A burst waits for a turn here rather than opening a connection per call: Redis runs
    # one script at a time anyway, and a cluster's pools refuse calls past their size.
    _WATCHES[client] = ProgressWatch(timeout_s, max_in_flight=_SCRIPTS_IN_FLIGHT)
    return client


def connect_scripts(
    url: str, client: RedisClient, *, timeout_s: float = 0.05, retry_s: float = 0.25
) -> ScriptHost:
    """Where the stores run their per-request scripts: one pipelined connection
    (``MultiplexedRedis``, ten times cheaper per call) for a plain Redis server, ``client``
    itself for a cluster or TLS."""
    if isinstance(client, RedisCluster) or not multiplexable(url):
        return client
    return MultiplexedRedis(url, timeout_s=timeout_s, retry_s=retry_s)


class ProgressWatch:
    """When a redis-py client last got an answer, and the bound on its calls' silence.

    ``run(call)`` lets ``call`` wait as long as the client's calls keep being answered (the
    store is busy, not dead) and fails it with ``StoreUnavailable`` once none has been
    answered for ``bound_s`` while calls were outstanding. Before failing, the silence must
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
            async with asyncio.timeout(None) as scope:
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
        except TimeoutError:
            raise StoreUnavailable(
                f"Redis answered nothing for {self.bound_s:g} s with {self.in_flight} calls"
                " outstanding"
            ) from None
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
            watched.scope.reschedule(now)


class _Watched:
    """One call under watch: its timeout scope and the handle of its next check."""

    __slots__ = ("done", "extended", "handle", "scope")

    def __init__(self, scope: asyncio.Timeout) -> None:
        self.scope = scope
        self.done = False
        self.extended = False
        self.handle: asyncio.Handle | None = None


#: The progress watch of each client made by ``connect_redis``.
_WATCHES: weakref.WeakKeyDictionary[Any, ProgressWatch] = weakref.WeakKeyDictionary()


def watch_of(client: RedisClient) -> ProgressWatch:
    """The progress watch of ``client``; a client not made by ``connect_redis`` keeps its own
    timeouts (its calls are only translated)."""
    watch = _WATCHES.get(client)
    if watch is None:
        watch = _WATCHES[client] = ProgressWatch(math.inf)
    return watch


def single_node(host: ScriptHost) -> bool:
    """Whether one script can reach every key (not a cluster)."""
    return not isinstance(host, RedisCluster)


def bounds_calls(host: ScriptHost) -> bool:
    """Whether every script call of ``host`` is bounded by the outage rule: always, the
    pipelined connection by its watchdog, a redis-py client by its ``ProgressWatch``."""
    return True


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's errors into ``StoreUnavailable`` (the one place that does)."""
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc


class _TranslatedScript:
    """A redis-py script bounded by its client's ``ProgressWatch``, failing with
    ``StoreUnavailable`` like the pipelined connection's scripts."""

    __slots__ = ("_script", "_watch")

    def __init__(self, script: Any, watch: ProgressWatch) -> None:
        self._script = script
        self._watch = watch

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        return await self._watch.run(self._script(keys=keys, args=args))


def register_script(host: ScriptHost, source: str) -> MultiplexedScript | _TranslatedScript:
    """A Lua script on ``host``, called as ``await script(keys=[...], args=[...])``."""
    if isinstance(host, MultiplexedRedis):
        return host.register_script(source)  # raises ``StoreUnavailable`` subclasses itself
    return _TranslatedScript(host.register_script(source), watch_of(host))
