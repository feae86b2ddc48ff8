"""Shared Redis plumbing for the Redis backends: clients, scripts, error translation.

This module (with ``multiplex.py``) is where the ``redis`` package is imported: the stores of
the memory backend, and ``import tenantware``, never load it. redis-py's errors become
``StoreUnavailable`` here, the one exception the layers' failure policies catch.
Scripts are registered with ``register_script``: EVALSHA, reloaded on NOSCRIPT (after a
restart or a SCRIPT FLUSH).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tenantware.backends.errors import StoreUnavailable
from tenantware.backends.keys import tenant_key
from tenantware.backends.multiplex import MultiplexedRedis, MultiplexedScript, multiplexable

__all__ = [
    "RedisClient",
    "ScriptHost",
    "bounds_calls",
    "connect_redis",
    "connect_scripts",
    "redis_errors",
    "register_script",
    "single_node",
    "tenant_key",
]

#: Either client: both run scripts and commands the same way for single-slot work.
RedisClient = aioredis.Redis | RedisCluster
#: What runs the hot-path scripts: the pipelined connection, or a redis-py client.
ScriptHost = MultiplexedRedis | RedisClient


def connect_redis(
    url: str, *, timeout_s: float = 0.05, cluster: bool | None = None, **options: Any
) -> RedisClient:
    """A pooled asyncio client; ``redis+cluster://`` (or ``cluster=True``) for a cluster.

    ``timeout_s`` bounds every call so that a Redis outage costs each request at most that
    long before the caller's failure policy decides.
    """
    is_cluster = cluster if cluster is not None else url.startswith("redis+cluster://")
    if url.startswith("redis+cluster://"):
        url = "redis://" + url[len("redis+cluster://") :]
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        **options,
    }
    if is_cluster:
        return RedisCluster.from_url(url, **common)
    return aioredis.Redis.from_url(url, **common)


def connect_scripts(url: str, client: RedisClient, *, timeout_s: float = 0.05) -> ScriptHost:
    """Where the stores run their per-request scripts: one pipelined connection
    (``MultiplexedRedis``, ten times cheaper per call) for a plain Redis server, ``client``
    itself for a cluster or TLS."""
    if isinstance(client, RedisCluster) or not multiplexable(url):
        return client
    return MultiplexedRedis(url, timeout_s=timeout_s)


def single_node(host: ScriptHost) -> bool:
    """Whether one script can reach every key (not a cluster)."""
    return not isinstance(host, RedisCluster)


def bounds_calls(host: ScriptHost) -> bool:
    """Whether every call of ``host`` ends within its own deadline (the pipelined one)."""
    return isinstance(host, MultiplexedRedis)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py's errors into ``StoreUnavailable`` (the one place that does)."""
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"Redis: {type(exc).__name__}") from exc


class _TranslatedScript:
    """A redis-py script whose failures are ``StoreUnavailable``, like the pipelined one's."""

    __slots__ = ("_script",)

    def __init__(self, script: Any) -> None:
        self._script = script

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:  # as ``redis_errors``, without a generator per call
            return await self._script(keys=keys, args=args)
        except RedisError as exc:
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from exc


def register_script(host: ScriptHost, source: str) -> MultiplexedScript | _TranslatedScript:
    """A Lua script on ``host``, called as ``await script(keys=[...], args=[...])``."""
    if isinstance(host, MultiplexedRedis):
        return host.register_script(source)  # raises ``StoreUnavailable`` subclasses itself
    return _TranslatedScript(host.register_script(source))
