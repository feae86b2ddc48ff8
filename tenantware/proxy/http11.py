"""A narrow HTTP/1.1 upstream client for plain ``http://`` upstreams: asyncio + httptools.

aiohttp spends most of the gateway's upstream hop in its own machinery (request and response
objects, multidicts, stream readers, timers per read). This client does only what the hop
needs: one request written whole, the answer parsed by httptools (the parser uvicorn uses),
kept-alive connections pooled per (host, port). TLS, credentials in the URL and international
names stay with aiohttp (``proxy/fast_path.py`` routes).

Re-send rule: a request is sent again (once, on a new connection) only when no byte of it can
have been processed: the pooled connection was seen closed before writing, or, for an
idempotent method (GET, HEAD, PUT, DELETE, OPTIONS), a reused connection ended before any byte
of the answer. A POST written to a connection is never written again: the server may have read
it (the dispatcher's retries and fallbacks decide what happens next). aiohttp's rule too.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple
from urllib.parse import quote, urlsplit

import httptools

from tenantware.proxy.upstream import (
    Timeouts,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamTimeout,
    read_within,
    relayable_headers,
)

__all__ = ["Http11UpstreamClient"]

#: Buffered body bytes above which the socket stops being read (a slow reader holds no more),
#: and below which it is read again.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: The most decoded bytes one compressed chunk yields at a time.
DECODED_CHUNK = 256 * 1024

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
#: Request headers this client writes itself (the body is framed by its ``content-length``).
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
#: Printable ASCII stays as it is in a request target; anything else is percent-encoded.
_TARGET_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))
_CLOSED = "the upstream closed the connection"


class _Target(NamedTuple):
    """Where a URL's requests go: the pool key, the request line's target, the Host header."""

    host: str
    port: int
    path: str
    authority: str


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"the HTTP/1.1 fast path serves plain http:// URLs, not {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    authority = parts.netloc
    if parts.port == 80:
        authority = authority.rpartition(":")[0]
    return _Target(parts.hostname, parts.port or 80, quote(path, safe=_TARGET_SAFE), authority)


def _unsafe(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


def _request_head(method: str, target: _Target, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers; the caller's ``host`` wins over the URL's."""
    host = target.authority
    lines = []
    for name, value in headers.items():
        if _unsafe(name) or _unsafe(value):
            raise ValueError(f"newline or NUL in the request header {name!r}")
        lower = name.lower()
        if lower in _FRAMING:
            if lower == "host":
                host = value
            continue
        lines.append(f"{name}: {value}\r\n")
    if body or method not in _IDEMPOTENT:
        lines.append(f"content-length: {len(body)}\r\n")
    text = f"{method} {target.path} HTTP/1.1\r\nhost: {host}\r\n{''.join(lines)}\r\n"
    return text.encode("utf-8")


class _Stale(Exception):
    """A reused connection ended before any byte of its answer (maybe never read)."""


class _Extra(Exception):
    """The upstream sent more than one answer to one request."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer being read on it (at most one at a time)."""

    def __init__(self, client: Http11UpstreamClient, key: tuple[str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        #: Requests answered on this connection (the next one on it is a reuse).
        self.answered = 0
        #: When it went back to the pool (``loop.time()``).
        self.idle_since = 0.0
        self.busy = False
        self.loop = asyncio.get_running_loop()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw: list[tuple[bytes, bytes]] = []
        self.length = -1
        self.encoding = b""
        self.keep_alive = False
        self.got_bytes = False
        self.headers_done = False
        self.done = False
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        #: The call's time limits: headers by ``headers_by``, all of it by ``deadline``, and
        #: no wait for the body's next bytes (started at ``since``) longer than ``idle_s``.
        self.headers_by = 0.0
        self.deadline = 0.0
        self.idle_s = 0.0
        self.since = -1.0
        self.watchdog: asyncio.TimerHandle | None = None
        self._skip_informational = False
        self.head_request = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except (_Extra, httptools.HttpParserError) as exc:
            if self.done:
                # Bytes after the answer (httptools may wrap ``_Extra``): the answer stands,
                # the connection is not reused.
                self.keep_alive = False
                self.close()
            else:
                self._fail(UpstreamConnectError(f"malformed upstream answer: {exc}"))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectError("the upstream switched protocols"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.client.forget(self)

    def pause_writing(self) -> None:  # the request is written whole: nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _Extra  # a second answer to one request: stop parsing it
        self.raw = []
        self.length = -1
        self.encoding = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        self.raw.append((lower, value))
        if lower == b"content-length":
            self.length = int(value) if value.isdigit() else -1
        elif lower == b"content-encoding":
            self.encoding = value.strip().lower()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._skip_informational = True  # 100 Continue and the like: the answer follows
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.head_request:
            # No body follows, whatever content-length says; the parser would wait for one.
            self.done = True
            self.keep_alive = False
            self.length = -1
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._skip_informational:
            self._skip_informational = False
            return
        self.done = True
        self._wake()

    # -- state changes ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _ended(self, exc: Exception | None) -> None:
        """The server closed (or reset) the connection."""
        if not self.busy or self.done or self.error is not None:
            self.closed = True
            return
        if not self.got_bytes and self.answered:
            self.error = _Stale()
        elif exc is None and self.headers_done and self.length < 0 and not self._chunked():
            self.done = True  # a body framed by the end of the connection
            self.keep_alive = False
        else:
            why = "before its answer ended" if self.headers_done else "before answering"
            self.error = UpstreamConnectError(f"{_CLOSED} {why}" + (f": {exc}" if exc else ""))
        self.closed = True
        self._wake()

    def _chunked(self) -> bool:
        return any(
            name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in self.raw
        )

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _check_time(self) -> None:
        """The call's one timer: fires at the next moment a limit could be passed."""
        self.watchdog = None
        if self.done or self.error is not None:
            return
        now = self.loop.time()
        if now >= self.deadline:
            self._fail(UpstreamTimeout("the upstream call took longer than its total timeout"))
            return
        if not self.headers_done:
            if now >= self.headers_by:
                self._fail(UpstreamTimeout("the upstream sent no answer in time"))
                return
            wake = self.headers_by
        else:
            since, idle_s = self.since, self.idle_s
            if idle_s <= 0:  # no idle limit (as aiohttp reads 0): only the total
                wake = self.deadline
            elif since >= 0 and now - since >= idle_s:
                self._fail(UpstreamTimeout("the upstream sent nothing for its idle timeout"))
                return
            else:
                wake = (now if since < 0 else since) + idle_s
        self.watchdog = self.loop.call_at(min(wake, self.deadline), self._check_time)

    # -- the calling side ---------------------------------------------------------------------

    async def exchange(
        self, request: bytes, head: bool, timeouts: Timeouts, deadline: float
    ) -> None:
        """Write the request and wait for the answer's headers."""
        self.busy = True
        self.head_request = head
        now = self.loop.time()
        self.deadline = deadline
        self.headers_by = now + timeouts.first_byte_s
        self.idle_s = timeouts.idle_s
        self.watchdog = self.loop.call_at(min(self.headers_by, deadline), self._check_time)
        assert self.transport is not None
        self.transport.write(request)
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await self.waiter

    async def next_bytes(self) -> bytes:
        """The buffered body bytes (waiting for some), ``b""`` at the body's end."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self.since = self.loop.time()
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.since = -1.0
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.buffered < LOW_WATER and not self.closed and self.transport:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """The caller is done with the answer: pool the connection if it can serve another."""
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.cancel()
        if self.done and self.keep_alive and self.error is None and not self.closed:
            self.answered += 1
            self.busy = False
            self._reset()
            self.client.release(self)
            return
        self.busy = False
        self.close()
        self.client.discard(self)


def _decoder(encoding: bytes) -> zlib._Decompress | None:
    """gzip and deflate are decoded, as aiohttp does. The caller's ``accept-encoding`` is sent
    as given (the dispatcher asks for ``identity``); without one aiohttp would ask for gzip and
    deflate, this client asks for nothing: either way the caller reads the decoded body."""
    if encoding in (b"gzip", b"x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == b"deflate":
        return zlib.decompressobj(zlib.MAX_WBITS)
    return None


class _Http11Response:
    __slots__ = (
        "_conn",
        "_decoder",
        "_deflate",
        "_finished",
        "_length",
        "_raw",
        "_tail",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        #: Every header, names in lower case (the connection starts a new list per answer).
        self._raw = conn.raw
        #: The declared ``content-length`` (of the encoded body), -1 when none.
        self._length = conn.length
        self.headers = relayable_headers(conn.raw)
        self._decoder = _decoder(conn.encoding) if conn.encoding else None
        #: A ``deflate`` body may be raw deflate (no zlib header): decided at its first bytes.
        self._deflate = conn.encoding == b"deflate"
        self._finished = False
        #: Compressed bytes not decoded yet (``DECODED_CHUNK`` reached).
        self._tail = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for lower, value in self._raw:
            if lower == wanted:
                return value.decode("utf-8", "surrogateescape")
        return None

    async def read(self, max_bytes: int) -> bytes:
        return await read_within(self.read_chunk, self._length, max_bytes)

    async def read_chunk(self) -> bytes:
        if self._finished:
            return b""
        if self._decoder is None:
            data = await self._conn.next_bytes()
            if not data:
                self._finish()
            return data
        return await self._decoded_chunk(self._decoder)

    async def _decoded_chunk(self, decoder: zlib._Decompress) -> bytes:
        """The next decoded bytes, at most ``DECODED_CHUNK`` at a time: a small compressed
        chunk cannot expand into memory beyond that before ``read`` counts it."""
        while True:
            data = self._tail
            if data:
                self._tail = b""
            else:
                data = await self._conn.next_bytes()
                if not data:
                    try:
                        rest = decoder.flush()
                    except zlib.error as exc:
                        raise UpstreamConnectError(f"undecodable upstream body: {exc}") from exc
                    self._finish()
                    return rest
                if self._deflate:
                    self._deflate = False
                    if data[0] & 0x0F != 8:  # no zlib header: raw deflate
                        decoder = self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                out = decoder.decompress(data, DECODED_CHUNK)
            except zlib.error as exc:
                raise UpstreamConnectError(f"undecodable upstream body: {exc}") from exc
            self._tail = decoder.unconsumed_tail
            if out:
                return out

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    @property
    def ended(self) -> bool:
        if self._finished:
            return True
        conn = self._conn
        return conn.done and not conn.chunks and conn.error is None and self._decoder is None

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._conn.finish()

    def close_now(self) -> None:
        """Synchronous: a connection whose answer ended is pooled, any other closed."""
        self._finish()

    async def aclose(self) -> None:
        self._finish()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("no upstream connection was free in time"))


class Http11UpstreamClient:
    """Keep-alive HTTP/1.1 over asyncio protocols, for ``http://`` URLs without credentials.

    ``pool_size`` bounds the connections in use at once (0: no bound), ``keepalive_s`` how long
    an idle connection is kept, as aiohttp's connector options of the same meaning."""

    def __init__(self, *, pool_size: int = 0, keepalive_s: float = 30.0) -> None:
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        #: The idle connections to each (host, port), the most recently used last.
        self._pools: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        #: Connections handed to a call and not yet finished with.
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._all: set[_Connection] = set()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _target(url)
            if len(self._targets) < 1024:
                self._targets[url] = target
        return target

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        target = self._target(url)
        request = _request_head(method, target, headers, body)
        if body:
            request += body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total_s
        key = (target.host, target.port)
        resent = False
        while True:
            conn = await self._acquire(key, timeouts, deadline, pooled=not resent)
            try:
                await conn.exchange(request, method == "HEAD", timeouts, deadline)
            except _Stale:
                conn.finish()
                if resent or method not in _IDEMPOTENT:
                    raise UpstreamConnectError(f"{_CLOSED} before answering") from None
                resent = True
                continue
            except BaseException:
                conn.finish()
                raise
            return _Http11Response(conn)

    async def _acquire(
        self, key: tuple[str, int], timeouts: Timeouts, deadline: float, *, pooled: bool
    ) -> _Connection:
        """A pooled connection to ``key`` if one is idle (and ``pooled``), else a new one."""
        loop = asyncio.get_running_loop()
        if self._pool_size and self._in_use >= self._pool_size:
            await self._wait_for_room(loop, deadline)
        idle = self._pools.get(key) if pooled else None
        if idle:
            now = loop.time()
            while idle:
                conn = idle.pop()
                if conn.closed or now - conn.idle_since >= self._keepalive_s:
                    conn.close()
                    continue
                self._in_use += 1
                return conn
        self._in_use += 1
        try:
            return await self._connect(key, timeouts, deadline)
        except BaseException:
            self._in_use -= 1
            self._wake_waiter()
            raise

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        while self._in_use >= self._pool_size:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_waiter()  # woken, but leaving: the room goes to the next
                raise
            finally:
                timer.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(
        self, key: tuple[str, int], timeouts: Timeouts, deadline: float
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = min(timeouts.connect_s, max(deadline - loop.time(), 0.0))
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1]
                )
        except TimeoutError:
            raise UpstreamTimeout("connecting to the upstream timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from exc
        self._all.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """An answered connection goes back to its pool."""
        self._in_use -= 1
        conn.idle_since = conn.loop.time()
        idle = self._pools.get(conn.key)
        if idle is None:
            idle = self._pools[conn.key] = []
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_at(
                conn.idle_since + self._keepalive_s, self._sweep, conn.loop
            )
        self._wake_waiter()

    def discard(self, conn: _Connection) -> None:
        """A connection that cannot be reused (it is closing)."""
        self._in_use -= 1
        self._wake_waiter()

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for longer than ``keepalive_s``."""
        self._sweeper = None
        now = loop.time()
        oldest = now
        for idle in self._pools.values():
            keep = []
            for conn in idle:
                if conn.closed or now - conn.idle_since >= self._keepalive_s:
                    conn.close()
                else:
                    keep.append(conn)
                    oldest = min(oldest, conn.idle_since)
            idle[:] = keep
        if any(self._pools.values()):
            self._sweeper = loop.call_at(oldest + self._keepalive_s, self._sweep, loop)

    def idle_connections(self, host: str, port: int) -> int:
        """How many pooled connections to ``host:port`` wait for a request (for tests)."""
        return sum(not conn.closed for conn in self._pools.get((host, port), ()))

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._pools.clear()
        for conn in list(self._all):
            conn.close()
        # Let the transports finish closing (their sockets are released on the next turns).
        for _ in range(2):
            await asyncio.sleep(0)
