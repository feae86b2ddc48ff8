"""The upstream hop behind one small interface, with an aiohttp and an httpx implementation.

aiohttp is the default: relaying a request through it costs about a quarter of the CPU of
httpx's default transport on this kind of machine. The httpx client stays for any anyio
backend (trio) and for in-process tests through ``httpx.ASGITransport``/``MockTransport``.
Both clients are created lazily on first use (so they bind to the running loop) and must be
closed with ``aclose()`` (the gateway's lifespan does it).

Each call has four time limits (``Timeouts``): connecting, the response headers, the wait for
the body's next bytes, and the whole call. Kept apart because they guard different things: a
hanging upstream shows in the headers (seconds), a stalled stream in the gap between events,
and only the total may be as long as the longest generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import NamedTuple, Protocol

import aiohttp
import anyio
import httpx

__all__ = [
    "AiohttpUpstreamClient",
    "HttpxUpstreamClient",
    "Timeouts",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTooLarge",
    "UpstreamUnavailable",
    "read_within",
    "relayable_headers",
]

#: Response headers worth relaying to the client; the rest describe the upstream account.
_RELAYED_HEADERS = frozenset(
    {"content-type", "retry-after", "retry-after-ms", "x-should-retry", "openai-processing-ms"}
)
_RELAYED_RAW = frozenset(name.encode() for name in _RELAYED_HEADERS)


class UpstreamUnavailable(Exception):
    """The upstream could not be reached or did not answer in time."""


class UpstreamConnectError(UpstreamUnavailable):
    """Connecting failed or the connection broke."""


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream did not answer (or send the next bytes) within the timeout."""


class UpstreamTooLarge(Exception):
    """The upstream's answer is larger than the gateway relays (not retried elsewhere: the
    upstream works, its answer is the problem)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream answer exceeds {limit} bytes")
        self.limit = limit


class Timeouts(NamedTuple):
    """The time limits of one call, in seconds (built from its ``Upstream`` per kind of call)."""

    connect_s: float
    #: Until the response headers.
    first_byte_s: float
    #: Longest wait for the body's next bytes.
    idle_s: float
    #: The whole call, from sending the request to the end of the body.
    total_s: float


class UpstreamResponse(Protocol):
    """An upstream answer, read whole (``read``) or as it arrives (``read_chunk``)."""

    status: int
    #: Relayable headers as lower-case ASGI pairs.
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None: ...

    async def read(self, max_bytes: int) -> bytes:
        """The whole body; ``UpstreamTooLarge`` as soon as it is known to exceed
        ``max_bytes`` (from ``content-length``, else while reading), never buffering more."""
        ...

    async def read_chunk(self) -> bytes:
        """The next non-empty bytes of the body, ``b""`` at its end: the proxy's stream relay
        calls it once per event (no async generator step, unlike iterating ``chunks()``)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    @property
    def ended(self) -> bool:
        """Whether the bytes read so far are known to be the whole body (``False`` when not
        known yet): the relay then sends the last event and the response's end together."""
        ...

    def close_now(self) -> Awaitable[None] | None:
        """Close the response: at once when it can (``None``: nothing left to wait for, so no
        cancellation can cut it short and no shield is needed), else the awaitable that
        finishes closing (the caller awaits it shielded)."""
        ...

    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


async def read_within(
    read_chunk: Callable[[], Awaitable[bytes]], declared: int, max_bytes: int
) -> bytes:
    """A whole body read chunk by chunk; ``UpstreamTooLarge`` as soon as its declared length
    (-1: none) or the bytes read exceed ``max_bytes``."""
    if declared > max_bytes:
        raise UpstreamTooLarge(max_bytes)
    chunks: list[bytes] = []
    size = 0
    while chunk := await read_chunk():
        size += len(chunk)
        if size > max_bytes:
            raise UpstreamTooLarge(max_bytes)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def relayable_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The relayable headers of the raw byte pairs as received: no str round trip."""
    return [(lower, value) for name, value in raw if (lower := name.lower()) in _RELAYED_RAW]


class _AiohttpResponse:
    __slots__ = (
        "_deadline",
        "_idle_s",
        "_loop",
        "_response",
        "_since",
        "_watchdog",
        "headers",
        "status",
    )

    def __init__(self, response: aiohttp.ClientResponse, idle_s: float, deadline: float) -> None:
        self._response = response
        self.status = response.status
        self.headers = relayable_headers(response.raw_headers)
        #: The longest wait for the body's next bytes.
        self._idle_s = idle_s
        #: The loop time by which the whole call must be over.
        self._deadline = deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When the pending ``read_chunk`` started waiting; -1 while none waits.
        self._since = -1.0
        self._watchdog: asyncio.TimerHandle | None = None

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def read(self, max_bytes: int) -> bytes:
        response = self._response
        length = response.content_length
        if length is not None and length > max_bytes:
            raise UpstreamTooLarge(max_bytes)
        # Read as ``ClientResponse.read`` does, counting: ``content-length`` may be absent
        # (chunked) and counts compressed bytes.
        content = response.content
        chunks: list[bytes] = []
        size = 0
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            # The headers are in: from here on the body's gaps are bounded by the idle timeout.
            connection.protocol.read_timeout = self._idle_s
        loop = asyncio.get_running_loop()
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamTooLarge(max_bytes)
                if loop.time() > self._deadline:
                    raise UpstreamTimeout("the upstream call took longer than its total timeout")
                chunks.append(chunk)
        except (UpstreamTooLarge, UpstreamTimeout):
            raise
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrived, ``b""`` at the end of the body."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._watch_idle(loop)
        self._since = loop.time()
        try:
            # ``readany`` directly: ``iter_any()`` would add an async iterator per chunk.
            return await self._response.content.readany()
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        finally:
            self._since = -1.0

    def _watch_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time out a streamed body's reads with one timer per stream, not one per chunk.

        aiohttp's ``sock_read`` re-arms a timer for every chunk it receives (a libuv timer
        under uvloop: a few µs, twenty-odd times per stream). For the body of a stream it is
        switched off here and one watchdog checks, once per idle period (or at the call's
        deadline, if sooner), whether a read has been waiting that long or the call has run
        out of time: the same limits, whichever ``read_chunk`` they hit.
        """
        connection = self._response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None or not self._idle_s:
            return  # the body has arrived whole: nothing left to wait for
        # Takes effect at the next chunk, which cancels the timer aiohttp armed at the last.
        protocol.read_timeout = None
        wake = min(loop.time() + self._idle_s, self._deadline)
        self._watchdog = loop.call_at(wake, self._check_idle)

    def _check_idle(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        since = self._since
        if since < 0:  # not waiting (the relay is busy with the last chunk)
            since = now
        if now >= self._deadline:
            self._time_out("the upstream call took longer than its total timeout")
            return
        if now - since >= self._idle_s:
            self._time_out("the upstream sent nothing for longer than its idle timeout")
            return
        self._watchdog = self._loop.call_at(
            min(since + self._idle_s, self._deadline), self._check_idle
        )

    def _time_out(self, why: str) -> None:
        self._watchdog = None
        exc = aiohttp.SocketTimeoutError(why)
        connection = self._response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.set_exception(exc)
        self._response.content.set_exception(exc)

    @property
    def ended(self) -> bool:
        return self._response.content.at_eof()

    def close_now(self) -> None:
        """Synchronous close (aiohttp's release/close never wait): callers need no shield."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        self._response.release()
        self._response.close()

    async def aclose(self) -> None:
        self.close_now()


def _translate_httpx(exc: httpx.TransportError) -> UpstreamUnavailable:
    """httpx's transport errors as the proxy's two kinds of upstream failure."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(str(exc) or "upstream timed out")
    return UpstreamConnectError(str(exc) or type(exc).__name__)


def _translate_aiohttp(exc: Exception) -> Exception:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(str(exc) or "upstream timed out")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    return exc


class AiohttpUpstreamClient:
    """One pooled ``aiohttp.ClientSession`` shared by all requests of a process."""

    def __init__(self, *, pool_size: int = 0, keepalive_s: float = 30.0) -> None:
        self._pool_size = pool_size
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        #: One ``ClientTimeout`` per ``Timeouts``: upstreams have fixed timeouts.
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            # ``sock_read`` bounds the wait for the headers (the body's reads get the idle
            # timeout once they start); the total is the response's watchdog's.
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=timeouts.connect_s,
                sock_read=min(timeouts.first_byte_s, timeouts.total_s),
            )
            if len(self._timeouts) < 256:
                self._timeouts[timeouts] = timeout
        return timeout

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, keepalive_timeout=self._keepalive_s, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=("User-Agent",), auto_decompress=True
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        session = self._session or self._get_session()
        timeout = self._timeouts.get(timeouts) or self._timeout(timeouts)
        deadline = asyncio.get_running_loop().time() + timeouts.total_s
        try:
            # aiohttp copies ``headers`` into its own multidict: no copy needed here.
            response = await session.request(
                method, url, data=body or None, headers=headers, timeout=timeout
            )
        except Exception as exc:
            raise _translate_aiohttp(exc) from exc
        return _AiohttpResponse(response, timeouts.idle_s, deadline)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _HttpxResponse:
    __slots__ = ("_deadline", "_idle_s", "_iterator", "_response", "headers", "status")

    def __init__(self, response: httpx.Response, idle_s: float, deadline: float) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = relayable_headers(response.headers.raw)
        self._idle_s = idle_s
        #: ``anyio.current_time()`` by which the whole call must be over.
        self._deadline = deadline
        self._iterator: AsyncGenerator[bytes, None] | None = None

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def read(self, max_bytes: int) -> bytes:
        length = self._response.headers.get("content-length")
        declared = int(length) if length is not None and length.isdigit() else -1
        return await read_within(self.read_chunk, declared, max_bytes)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise _translate_httpx(exc) from exc

    async def read_chunk(self) -> bytes:
        """The next non-empty bytes of the body, ``b""`` at its end (within the idle and the
        total timeouts: a transport such as ``ASGITransport`` enforces none of its own)."""
        if self._iterator is None:
            self._iterator = self.chunks()
        left = self._deadline - anyio.current_time()
        try:
            with anyio.fail_after(min(self._idle_s, max(left, 0.0))):
                async for chunk in self._iterator:
                    if chunk:
                        return chunk
        except TimeoutError:
            raise UpstreamTimeout("the upstream sent nothing in time") from None
        return b""

    @property
    def ended(self) -> bool:
        return False  # known only when the iterator stops

    def close_now(self) -> Awaitable[None]:
        """httpx closes asynchronously: the caller awaits this, shielded."""
        return self.aclose()

    async def aclose(self) -> None:
        if self._iterator is not None:
            # Finalise the generator now rather than whenever the collector finds it.
            await self._iterator.aclose()
        await self._response.aclose()


class HttpxUpstreamClient:
    """Upstream hop over one shared ``httpx.AsyncClient`` (pass ``transport=`` in tests).

    Its time limits are enforced with anyio around the transport's calls, so they hold for an
    in-process transport too; ``httpx.ASGITransport`` runs the app whole before returning
    the headers, so there the first-byte timeout bounds the whole answer."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            )
        return self._client

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        client = self._get_client()
        first_byte_s = min(timeouts.first_byte_s, timeouts.total_s)
        request = client.build_request(
            method,
            url,
            headers=headers,
            content=body or None,
            # Reads are bounded here too (for the headers) and by ``read_chunk`` (the body).
            timeout=httpx.Timeout(max(first_byte_s, timeouts.idle_s), connect=timeouts.connect_s),
        )
        deadline = anyio.current_time() + timeouts.total_s
        try:
            with anyio.fail_after(first_byte_s):
                response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _translate_httpx(exc) from exc
        except TimeoutError:
            raise UpstreamTimeout("the upstream sent no answer in time") from None
        return _HttpxResponse(response, timeouts.idle_s, deadline)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
