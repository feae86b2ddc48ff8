"""Limits that keep idle and slow clients from starving real requests (``tenantware serve``).

uvicorn's HTTP/1.1 protocol (httptools) bounds neither the time a client may take to send its
request headers nor their size or number, and it starts its keep-alive timer only after a
response: a socket that never sends a byte, or sends one header byte every few seconds
(slowloris), stays open for ever and holds a file descriptor; a header that never ends grows
in memory. Its ``limit_concurrency`` counts those idle sockets too and answers real requests
with a plain-text 503, so it would let idle sockets starve real requests rather than prevent
it. None of this is visible to an ASGI app, which is called only once the headers are in, so
the guard is a subclass of uvicorn's protocol (``uvicorn.Config(http=...)``):

- **header read timeout**: a new connection must complete its request headers within
  ``header_timeout_s``, and so must each later request on a kept-alive connection from its
  first byte (a partial request gets 408; a silent socket is closed);
- **keep-alive idle timeout**: uvicorn's own ``timeout_keep_alive`` between requests;
- **header size and count**: past ``max_header_bytes`` (request line included) or
  ``max_headers``, 431 and the connection is closed, without buffering the rest;
- **maximum connections**: past ``max_connections`` in a worker, the connection that has
  waited longest for its next request headers is closed to make room; when every connection
  is busy with a request, the new request gets 503 with ``retry-after``.

Every refusal is an OpenAI-shaped JSON error; malformed requests get one too (400) instead of
uvicorn's plain text. The limits reach every worker process through one environment variable.
"""

from __future__ import annotations

import asyncio
import os
import resource
from typing import Any, ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tenantware.errors import error_body

__all__ = ["PROTOCOL_PATH", "GuardedHttpToolsProtocol", "ServeLimits"]

#: What ``tenantware serve`` gives uvicorn as its ``http`` protocol.
PROTOCOL_PATH = "tenantware.server_limits:GuardedHttpToolsProtocol"
_ENV_LIMITS = "TENANTWARE_SERVE_LIMITS"
#: File descriptors kept free of client connections: the upstream pool, Redis, the ledger.
_RESERVED_FDS = 128


def _default_max_connections() -> int:
    """Below the process's file-descriptor limit, so clients cannot exhaust it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, min(10_000, soft - _RESERVED_FDS))


class ServeLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The connection limits of ``tenantware serve`` (one set per process, every worker)."""

    header_timeout_s: float = 10.0
    keep_alive_timeout_s: int = 5
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_connections: int = msgspec.field(default_factory=_default_max_connections)

    def export(self) -> None:
        """Make these the limits of every protocol created in this process and its workers."""
        os.environ[_ENV_LIMITS] = msgspec.json.encode(self).decode()
        _current.clear()

    @classmethod
    def current(cls) -> ServeLimits:
        if not _current:
            raw = os.environ.get(_ENV_LIMITS)
            _current.append(msgspec.json.decode(raw, type=cls) if raw else cls())
        return _current[0]


_current: list[ServeLimits] = []

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above.

    Per request this adds a few attribute checks and dictionary moves, no timer: one sweep
    per worker closes the connections whose header deadline has passed.
    """

    #: Connections of this worker waiting for request headers, oldest wait first: new ones,
    #: idle kept-alive ones (no deadline: uvicorn's keep-alive timer runs) and those whose
    #: next request has started (with a deadline). The first are evicted first.
    _waiting: ClassVar[dict[GuardedHttpToolsProtocol, None]] = {}
    _sweep: ClassVar[asyncio.TimerHandle | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = ServeLimits.current()
        self._awaiting_headers = False
        self._header_deadline: float | None = None
        self._header_bytes = 0

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self._over_limit():
            self._evict_one_waiting()
        self._wait(deadline=self.loop.time() + self.limits.header_timeout_s)
        cls = GuardedHttpToolsProtocol
        if cls._sweep is None or cls._sweep.cancelled():
            cls._sweep = self.loop.call_later(self._sweep_interval(), self._sweep_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        idle_next = not self.pipeline
        super().on_response_complete()
        if idle_next and not self.transport.is_closing():
            self._wait(deadline=None)  # idle: uvicorn's keep-alive timer runs; evictable

    # -- request headers ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers and self._header_deadline is None:
            # The first bytes of the next request on a kept-alive connection.
            self._wait(deadline=self.loop.time() + self.limits.header_timeout_s)
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "request headers are too large", "request_headers_too_large")

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        if len(self.headers) > self.limits.max_headers:
            self._refuse(431, "too many request headers", "too_many_request_headers")
            return
        if self._over_limit():
            self._evict_one_waiting()
            if self._over_limit():
                self._refuse(503, "the server is at its connection limit", "server_busy")
                return
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser rejects, as an OpenAI-shaped error."""
        self._refuse(400, "malformed HTTP request", "bad_request")

    # -- helpers -----------------------------------------------------------------------------

    def _wait(self, *, deadline: float | None) -> None:
        self._awaiting_headers = True
        self._header_deadline = deadline
        self._header_bytes = 0
        waiting = self._waiting
        waiting.pop(self, None)
        waiting[self] = None

    def _stop_waiting(self) -> None:
        self._awaiting_headers = False
        self._header_deadline = None
        self._waiting.pop(self, None)

    def _sweep_interval(self) -> float:
        return max(0.05, min(1.0, self.limits.header_timeout_s / 4))

    def _sweep_expired(self) -> None:
        """Close the connections whose headers are late; runs while any connection is open."""
        now = self.loop.time()
        late = []
        for other in self._waiting:
            deadline = other._header_deadline
            if deadline is None:
                continue
            if deadline > now:
                break  # deadlines are set in the order of the dictionary
            late.append(other)
        for other in late:
            if other._header_bytes:
                other._refuse(408, "request headers were not received in time", "request_timeout")
            else:
                other._close()
        cls = GuardedHttpToolsProtocol
        cls._sweep = (
            self.loop.call_later(self._sweep_interval(), self._sweep_expired)
            if self.connections
            else None
        )

    def _over_limit(self) -> bool:
        """More open connections than allowed; closed ones leave the set a loop turn later."""
        if len(self.connections) <= self.limits.max_connections:
            return False
        open_now = sum(1 for other in self.connections if not other.transport.is_closing())
        return open_now > self.limits.max_connections

    def _evict_one_waiting(self) -> None:
        for other in self._waiting:
            if other is not self:
                other._close()
                return

    def _close(self) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer with an OpenAI-shaped error and close the connection."""
        self._stop_waiting()
        if self.transport.is_closing():
            return
        body = error_body(message, type="invalid_request_error", code=code)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        head.append(b"content-type: application/json\r\n")
        head.append(b"content-length: %d\r\n" % len(body))
        if status == 503:
            head.append(b"retry-after: 1\r\n")
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        self.transport.close()
