"""Shared Redis plumbing for the Redis backends: clients, scripts, error translation.

This module (with ``multiplex.py``) is where the ``redis`` package is imported: the stores of
the memory backend, and ``import tenantware``, never load it. redis-py's errors become
``StoreUnavailable`` here, the one exception the layers' failure policies catch.
Scripts are registered with ``register_script``: EVALSHA, reloaded on NOSCRIPT (after a
restart or a SCRIPT FLUSH).

Outage evidence for redis-py clients (Redis Cluster, TLS) follows the pipelined connection's
rule (``backends/progress.py``): a call fails when no reply at all reached the same client
for ``timeout_s`` while calls are outstanding, never because it alone waited long behind
other clients' scripts or needed several round trips. redis-py's own socket timeout stays as
a last resort, well above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from tenantware.backends.errors import StoreUnavailable
from tenantware.backends.keys import tenant_key
from tenantware.backends.multiplex import MultiplexedRedis, MultiplexedScript, multiplexable
from tenantware.backends.progress import ProgressWatch, watch, watch_of

__all__ = [
    "RedisClient",
    "ScriptHost",
    "connect_redis",
    "connect_scripts",
    "redis_errors",
    "register_script",
    "single_node",
    "tenant_key",
]

#: redis-py's socket timeout, in bounds: only for a call the progress rule cannot reach.
_SOCKET_TIMEOUT_FACTOR = 20
_MIN_SOCKET_TIMEOUT_S = 2.0
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
    progress = ProgressWatch(timeout_s, max_in_flight=_SCRIPTS_IN_FLIGHT)
    watch(client, progress)
    _report_replies(client, progress)
    return client


def _report_replies(client: RedisClient, progress: ProgressWatch) -> None:
    """Make every connection ``client`` opens report each reply it reads to ``progress``.

    The connection class is swapped where the client makes connections (its pool; for a
    cluster, the node template and the nodes known so far), so the class redis-py chose for
    the URL (TCP, TLS, Unix socket) stays the base.
    """
    if isinstance(client, RedisCluster):
        template = client.nodes_manager.connection_kwargs
        template["connection_class"] = _reporting(template["connection_class"], progress)
        known = client.nodes_manager.startup_nodes | client.nodes_manager.nodes_cache
        for node in known.values():
            node.connection_class = template["connection_class"]
    else:
        pool = client.connection_pool
        pool.connection_class = _reporting(pool.connection_class, progress)


def _reporting(base: type[Any], progress: ProgressWatch) -> type[Any]:
    """``base`` whose ``read_response`` tells ``progress`` of every reply, errors included
    (a NOSCRIPT, a MOVED, a refused command are answers too)."""

    async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            reply = await base.read_response(self, *args, **kwargs)
        except ResponseError:
            progress.heard()
            raise
        progress.heard()
        return reply

    return type(f"Reporting{base.__name__}", (base,), {"read_response": read_response})


def connect_scripts(
    url: str, client: RedisClient, *, timeout_s: float = 0.05, retry_s: float = 0.25
) -> ScriptHost:
    """Where the stores run their per-request scripts: one pipelined connection
    (``MultiplexedRedis``, ten times cheaper per call) for a plain Redis server, ``client``
    itself for a cluster or TLS."""
    if isinstance(client, RedisCluster) or not multiplexable(url):
        return client
    return MultiplexedRedis(url, timeout_s=timeout_s, retry_s=retry_s)


def single_node(host: ScriptHost) -> bool:
    """Whether one script can reach every key (not a cluster)."""
    return not isinstance(host, RedisCluster)


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

    def send(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Awaitable[Any]:
        """Like ``MultiplexedScript.send``; redis-py makes the call when it is awaited."""
        return self(keys, args)


def register_script(host: ScriptHost, source: str) -> MultiplexedScript | _TranslatedScript:
    """A Lua script on ``host``, called as ``await script(keys=[...], args=[...])``."""
    if isinstance(host, MultiplexedRedis):
        return host.register_script(source)  # raises ``StoreUnavailable`` subclasses itself
    return _TranslatedScript(host.register_script(source), watch_of(host))
