"""Relaying an upstream's answer to the client: JSON whole, SSE event by event.

A stream is relayed with nothing buffered beyond an incomplete event while the client is
watched: when it leaves, the relay is cut at once (uvicorn's ``send`` stays silent after a
disconnect, only ``receive`` tells). The usage the answer reports, or an estimate of what was
relayed, lands in the request context for the metering and quota layers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import anyio
import msgspec
import structlog

from tenantware.context import Outcome, RequestContext, Usage, WireFormat
from tenantware.errors import anthropic_error_body, send_error
from tenantware.formats.adapter import StreamTranslator
from tenantware.formats.sse import sse_event
from tenantware.metering.usage import StreamTap
from tenantware.proxy.upstream import (
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnavailable,
)
from tenantware.types import Message, Receive, Send

__all__ = ["JSON_CONTENT_TYPE", "MODEL_SERVED_HEADER", "UPSTREAM_SERVED_HEADER", "Relay"]

#: Response header naming the model that answered (differs from the request after a fallback).
MODEL_SERVED_HEADER: Final = b"x-tenantware-model"
#: Response header naming the upstream that answered (a canary's candidate, say).
UPSTREAM_SERVED_HEADER: Final = b"x-tenantware-upstream"
JSON_CONTENT_TYPE: Final = (b"content-type", b"application/json")

log = structlog.get_logger("tenantware.proxy")

_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_encode = msgspec.json.Encoder().encode


class Relay:
    """Sends upstream answers to the client; one per proxy (it caches header pairs)."""

    def __init__(self) -> None:
        self._served_headers: dict[str, tuple[bytes, bytes]] = {}
        self._upstream_headers: dict[str | None, tuple[bytes, bytes]] = {}

    def served_header(self, model: str) -> tuple[bytes, bytes]:
        header = self._served_headers.get(model)
        if header is None:
            header = self._served_headers[model] = (MODEL_SERVED_HEADER, model.encode())
        return header

    def upstream_header(self, upstream: str | None) -> tuple[bytes, bytes]:
        header = self._upstream_headers.get(upstream)
        if header is None:
            value = (upstream or "").encode()
            header = self._upstream_headers[upstream] = (UPSTREAM_SERVED_HEADER, value)
        return header

    async def send_whole(
        self,
        ctx: RequestContext,
        send: Send,
        status: int,
        upstream_headers: list[tuple[bytes, bytes]],
        data: bytes,
        served: str,
        *,
        as_sent: bool = False,
    ) -> None:
        """Relay a whole upstream answer; a non-JSON error becomes an OpenAI-shaped one.

        ``as_sent`` keeps the upstream's content type (a stream answered with a whole body);
        otherwise the answer is relayed as JSON.
        """
        if status < 400:
            ctx.outcome = Outcome.OK
        else:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            if not data.startswith(b"{"):
                await send_error(
                    send,
                    status,
                    f"The upstream answered {status}.",
                    type="server_error" if status >= 500 else "invalid_request_error",
                    code="upstream_error",
                    ctx=ctx,
                    outcome=Outcome.UPSTREAM_ERROR,
                    headers=[
                        *(h for h in upstream_headers if h[0] != b"content-type"),
                        self.served_header(served),
                        self.upstream_header(ctx.upstream),
                    ],
                )
                return
        if as_sent:
            headers = [*upstream_headers]
        else:
            headers = [h for h in upstream_headers if h[0] != b"content-type"]
            headers.append(JSON_CONTENT_TYPE)
        headers.append((b"content-length", str(len(data)).encode()))
        headers.append(self.served_header(served))
        headers.append(self.upstream_header(ctx.upstream))
        ctx.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def relay_stream(
        self,
        ctx: RequestContext,
        response: UpstreamResponse,
        receive: Receive,
        send: Send,
        started: float,
        max_bytes: int,
        *,
        hide_usage: bool,
        tap: StreamTranslator | None = None,
    ) -> None:
        """Relay an SSE answer event by event while watching the client; cut it with an
        error event past ``max_bytes``. ``tap`` replaces the OpenAI usage tap (another wire
        format, or a translation: ``tenantware.formats.adapter``)."""
        if tap is None:
            tap = StreamTap(hide_usage=hide_usage)
        failed: UpstreamUnavailable | UpstreamTooLarge | None = None
        served_header = self.served_header(ctx.model_served or "")
        upstream_header = self.upstream_header(ctx.upstream)

        async def relay(watch: _Watch) -> None:
            nonlocal failed
            headers = [*_SSE_HEADERS, served_header, upstream_header]
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            read = response.read_chunk
            feed = tap.feed
            left = max_bytes
            last = b""
            try:
                while chunk := await read():
                    if ctx.first_byte_at is None:
                        ctx.first_byte_at = time.perf_counter()
                    left -= len(chunk)
                    if left < 0:
                        raise UpstreamTooLarge(max_bytes)
                    out = feed(chunk)
                    if response.ended:
                        # The last event and the end go out as one message (one write).
                        last = out + tap.flush()
                        break
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                else:
                    last = tap.flush()
            except (UpstreamUnavailable, UpstreamTooLarge) as exc:
                failed = exc
                last = _stream_error_event(exc, ctx.wire_format)
            # A disconnect reported after the last byte is the normal end, not a client
            # gone mid-stream (in-process transports report it during this last send).
            watch.finished = True
            await send({"type": "http.response.body", "body": last, "more_body": False})

        try:
            disconnected = await _while_watching(receive, relay)
        except* OSError:
            # The server could not write to the client: it is gone.
            disconnected = True
        ctx.upstream_latency_s = time.perf_counter() - started
        if tap.usage is not None:
            ctx.usage = tap.usage
        else:
            ctx.usage = Usage(
                input_tokens=ctx.estimated_prompt_tokens,
                output_tokens=tap.estimated_output_tokens(),
                estimated=True,
            )
        if tap.model:
            ctx.model_served = ctx.model_served or tap.model
        if disconnected:
            ctx.outcome = Outcome.CLIENT_DISCONNECTED
        elif failed is not None:
            ctx.outcome = Outcome.UPSTREAM_ERROR
            log.warning("upstream stream broke", upstream=ctx.upstream, error=type(failed).__name__)
        else:
            ctx.outcome = Outcome.OK


class _Watch:
    """What the disconnect watcher and the relay it watches tell each other."""

    __slots__ = ("cut", "disconnected", "finished")

    def __init__(self) -> None:
        #: The client left before the relay finished.
        self.disconnected = False
        #: The relay sent its last byte: a disconnect now is the normal end.
        self.finished = False
        #: The watcher cancelled the relay (the client left, or ``receive`` failed).
        self.cut = False


async def _watch_disconnect(receive: Receive, watch: _Watch, cancel: Callable[[], Any]) -> None:
    """Call ``cancel`` when the client leaves before the relay finished."""
    try:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                if not watch.finished:
                    watch.disconnected = watch.cut = True
                    cancel()
                return
    except Exception:
        if not watch.finished:
            watch.cut = True
            cancel()
        raise


def _asyncio_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop in this thread (trio)
        return None


async def _while_watching(
    receive: Receive, relay: Callable[[_Watch], Coroutine[Any, Any, None]]
) -> bool:
    """Run ``relay`` while watching the client; ``True`` if it left (and the relay was cut).

    On asyncio the relay runs in a plain task of its own and the watcher, another, cancels it
    natively: an anyio task group costs three cancel scopes, several times the rest of the
    per-stream overhead. In its own task each event resumes only the relay's few frames, not
    the whole ASGI stack's chain of awaiting coroutines (some twenty frames, twice per event).
    A cancellation of this task reaches the relay through ``await``; its count (``cancelling``)
    tells it from the watcher's cut. Elsewhere (trio) it is an anyio task group. Either way the
    watcher is done or cancelled and awaited before this returns.
    """
    watch = _Watch()
    host = _asyncio_task()
    if host is None:
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_disconnect, receive, watch, group.cancel_scope.cancel)
            await relay(watch)
            # See below: the watcher usually ends by itself.
            await anyio.lowlevel.checkpoint()
            group.cancel_scope.cancel()
        return watch.disconnected
    cancelling = host.cancelling()
    loop = asyncio.get_running_loop()
    relaying = loop.create_task(relay(watch))
    watcher = loop.create_task(_watch_disconnect(receive, watch, relaying.cancel))
    try:
        await relaying
        # Servers like uvicorn answer a pending receive() with http.disconnect once the
        # response is complete: let the watcher end by itself. Cancelling it costs a
        # cancellation round and leaves cyclic garbage (frames, tracebacks) for the GC.
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        # The watcher's cut of the relay, unless someone cancelled this task too.
        if not (watch.cut and host.cancelling() <= cancelling):
            raise
    finally:
        if not watcher.done():
            watcher.cancel()
            await asyncio.wait((watcher,))
    if not watcher.cancelled() and (error := watcher.exception()) is not None:
        raise error  # ``receive`` itself failed
    return watch.disconnected


def _stream_error_event(exc: UpstreamUnavailable | UpstreamTooLarge, wire: WireFormat) -> bytes:
    code = "upstream_error"
    if isinstance(exc, UpstreamTooLarge):
        message = f"The upstream stream is longer than the gateway relays ({exc.limit} bytes)."
        code = "upstream_response_too_large"
    elif isinstance(exc, UpstreamTimeout):
        message = "The upstream stopped sending in time."
    else:
        message = "The upstream stream was interrupted."
    if wire == "anthropic":
        return sse_event("error", anthropic_error_body(502, message))
    if wire == "responses":
        # The Responses API's own ``error`` event (its SDKs yield it as ``ResponseErrorEvent``).
        event = {"type": "error", "code": code, "message": message, "param": None}
        return sse_event("error", _encode(event))
    body = _encode(
        {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    )
    return sse_event(None, body)
