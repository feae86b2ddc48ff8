"""One pipelined Redis connection that runs every hot-path script of the process.

redis-py's per-command machinery (pool checkout, retry and timeout wrappers, command
packing) costs several times the script call itself, and a gateway request runs several
scripts (quota reserve and settle, admission acquire and release). Here all of them share one
connection: a call is encoded into RESP in one pass, the calls made within one turn of the
event loop go out in one write, and hiredis parses the replies, which Redis sends back in
order; Redis reads one batch per turn instead of one command per request (figures:
benchmarks/README.md, "Redis backend").

Outage evidence, not slowness: Redis is declared stalled when it has sent no reply bytes
for ``timeout_s`` while calls written to it are unanswered. A deep pipeline that drains (a
burst queued behind other clients' scripts) keeps sending replies and is waited for, however
long the queue; a stopped or unreachable server fails every waiting call within
``timeout_s`` of its last reply. Bytes already in the socket but not yet read (this process's
event loop was late) count as replies (``FIONREAD``), so a busy host is not mistaken for a
dead Redis. The failed connection is dropped and the next call opens a new one (no sooner
than ``retry_s`` after a failed connect). Failures are both ``StoreUnavailable`` (what the
layers' failure policies catch) and redis-py's exception types (``ConnectionError``,
``TimeoutError``, ``ResponseError``), so callers may treat both clients alike. Plain
``redis://`` and ``unix://`` URLs only: TLS and Redis Cluster stay on redis-py
(``connect_redis``), see ``multiplexable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as redis_exceptions
from redis.connection import parse_url

from tenantware.backends.errors import StoreUnavailable

__all__ = ["MultiplexedRedis", "MultiplexedScript", "multiplexable"]


class RedisConnectionError(StoreUnavailable, redis_exceptions.ConnectionError):
    """Redis is unreachable or closed the connection."""


class RedisTimeoutError(StoreUnavailable, redis_exceptions.TimeoutError):
    """Redis did not answer in time."""


class ResponseError(StoreUnavailable, redis_exceptions.ResponseError):
    """Redis refused the call (a script error, NOSCRIPT, BUSY, OOM...)."""


Arg = str | bytes | int | float
#: Longest TCP connect (a host that drops packets); refusals fail at once.
_CONNECT_TIMEOUT_S = 1.0


def multiplexable(url: str) -> bool:
    """Whether ``url`` names one plain Redis server this client can reach."""
    return url.startswith(("redis://", "unix://"))


def _bulk(value: Arg) -> bytes:
    """One RESP bulk string (numbers as redis-py writes them)."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bytes):
        data = value
    elif isinstance(value, float):
        data = repr(value).encode()
    else:
        data = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*parts: Arg) -> bytes:
    """A command as RESP: ``*<n>`` and one bulk string per part."""
    return b"*%d\r\n" % len(parts) + b"".join(map(_bulk, parts))


def _unread_bytes(transport: asyncio.Transport) -> int:
    """Bytes received by the kernel and not yet read (0 where it cannot be asked)."""
    if sys.platform == "win32":  # pragma: no cover - no FIONREAD for sockets there
        return 0
    import fcntl
    import termios

    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class _Connection(asyncio.Protocol):
    """The socket: writes batched per loop turn, replies matched to callers in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader(replyError=ResponseError)
        #: Callers waiting for a reply, oldest first (written or about to be).
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        #: Calls written to the socket and not answered yet.
        self._in_flight = 0
        #: Loop time of the last reply bytes, or of the write that ended an idle spell.
        self._progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._progress = self.loop.time()
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                self._fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()
            self._in_flight -= 1
            if future.done():  # the caller gave up (cancelled); the reply is dropped
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("Redis closed the connection"))

    # -- calls -------------------------------------------------------------------------------

    def call(self, payload: bytes) -> asyncio.Future[Any]:
        """Queue ``payload`` for the next write; the future of its reply."""
        future = self.loop.create_future()
        if self.closed:
            future.set_exception(RedisConnectionError("Redis connection closed"))
            return future
        self._waiting.append(future)
        self._outgoing.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.transport is None:
            return
        outgoing = self._outgoing
        if not self._in_flight:  # silence is counted from the first unanswered write
            self._progress = self.loop.time()
        self._in_flight += len(outgoing)
        self.transport.write(outgoing[0] if len(outgoing) == 1 else b"".join(outgoing))
        outgoing.clear()
        if self._watchdog is None:
            self._watchdog = self.loop.call_at(
                self._progress + self.timeout_s, self._check_progress
            )

    def _check_progress(self) -> None:
        """Fail every waiting call if Redis sent nothing for ``timeout_s`` while it owed
        replies; a connection that makes progress, however slowly, is left alone."""
        self._watchdog = None
        if not self._in_flight or self.closed or self.transport is None:
            return
        now = self.loop.time()
        if now - self._progress >= self.timeout_s and _unread_bytes(self.transport):
            self._progress = now  # replies are there; this event loop was late to read them
        if now - self._progress >= self.timeout_s:
            self._fail(
                RedisTimeoutError(
                    f"Redis sent nothing for {self.timeout_s:g} s "
                    f"with {self._in_flight} calls outstanding"
                )
            )
        else:
            self._watchdog = self.loop.call_at(
                self._progress + self.timeout_s, self._check_progress
            )

    def _fail(self, error: Exception) -> None:
        """Close the connection; every waiting caller gets ``error``."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._outgoing.clear()
        self._in_flight = 0
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self._fail(RedisConnectionError("Redis connection closed"))


class MultiplexedRedis:
    """``MultiplexedRedis("redis://127.0.0.1:6379/0", timeout_s=0.05)``: see the module doc.

    Connects on the first call (and again after a failure, or from another event loop).
    """

    def __init__(self, url: str, *, timeout_s: float = 0.05, retry_s: float = 0.25) -> None:
        if not multiplexable(url):
            raise ValueError("MultiplexedRedis takes redis:// or unix:// URLs")
        options = parse_url(url)  # type: ignore[no-untyped-call]
        self._host: str = options.get("host") or "localhost"
        self._port: int = int(options.get("port") or 6379)
        self._path: str | None = options.get("path")
        self._db = int(options.get("db") or 0)
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._retry_at = 0.0

    @property
    def address(self) -> str:
        """Where it connects (no credentials): for errors and logs."""
        return self._path or f"{self._host}:{self._port}"

    def register_script(self, source: str) -> MultiplexedScript:
        """A Lua script run with EVALSHA (EVAL once when Redis does not know it yet)."""
        return MultiplexedScript(self, source)

    async def execute(self, payload: bytes) -> Any:
        """Send one encoded command; its reply (``ResponseError`` raised, not returned)."""
        connection = self._connection
        loop = asyncio.get_running_loop()
        if connection is None or connection.closed or connection.loop is not loop:
            connection = await self._connect()
        return await connection.call(payload)

    async def execute_command(self, *parts: Arg) -> Any:
        return await self.execute(encode_command(*parts))

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise RedisConnectionError(f"Redis at {self.address} unreachable; retrying shortly")
        pending = self._connecting
        if pending is None or pending.get_loop() is not loop:
            pending = self._connecting = loop.create_task(self._open(loop))
            pending.add_done_callback(self._connected)
        return await asyncio.shield(pending)

    def _connected(self, task: asyncio.Future[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            old, self._connection = self._connection, task.result()
            if old is not None and old is not self._connection and not old.loop.is_closed():
                old.close()  # one left on another loop (its closing runs on that loop)
        else:
            self._retry_at = task.get_loop().time() + self.retry_s

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        def factory() -> _Connection:
            return _Connection(loop, self.timeout_s)

        try:
            # Connection refused is evidence at once; a slow handshake on a loaded host is
            # not (a stopped server still completes it: its calls are watched like any).
            async with asyncio.timeout(max(self.timeout_s * 4, _CONNECT_TIMEOUT_S)):
                if self._path:
                    _, connection = await loop.create_unix_connection(factory, self._path)
                else:
                    _, connection = await loop.create_connection(factory, self._host, self._port)
                try:
                    if self._password is not None:
                        credentials = (self._username, self._password) if self._username else ()
                        await connection.call(
                            encode_command("AUTH", *(credentials or (self._password,)))
                        )
                    if self._db:
                        await connection.call(encode_command("SELECT", self._db))
                except BaseException:
                    connection.close()
                    raise
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"Redis at {self.address} unreachable: {type(exc).__name__}"
            ) from None
        return connection

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class MultiplexedScript:
    """Called like redis-py's registered scripts: ``await script(keys=[...], args=[...])``."""

    __slots__ = ("_eval", "_evalsha", "_owner", "sha")

    def __init__(self, owner: MultiplexedRedis, source: str) -> None:
        self._owner = owner
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._evalsha = _bulk("EVALSHA") + _bulk(self.sha)
        self._eval = _bulk("EVAL") + _bulk(source)

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        body = b"".join(map(_bulk, (len(keys), *keys, *args)))
        count = b"*%d\r\n" % (3 + len(keys) + len(args))
        try:
            return await self._owner.execute(count + self._evalsha + body)
        except ResponseError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            return await self._owner.execute(count + self._eval + body)

    def send(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Awaitable[Any]:
        """The call queued now, in this event-loop turn, with every other call made in it
        (one write); await the answer (exactly once) like ``__call__``'s. Without an open
        connection it is made when awaited."""
        owner = self._owner
        connection = owner._connection
        if connection is None or connection.closed:
            return self(keys, args)
        try:
            if connection.loop is not asyncio.get_running_loop():
                return self(keys, args)
        except RuntimeError:
            return self(keys, args)
        body = b"".join(map(_bulk, (len(keys), *keys, *args)))
        count = b"*%d\r\n" % (3 + len(keys) + len(args))
        return self._answer(
            connection.call(count + self._evalsha + body), count + self._eval + body
        )

    async def _answer(self, reply: asyncio.Future[Any], fallback: bytes) -> Any:
        try:
            return await reply
        except ResponseError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            return await self._owner.execute(fallback)
