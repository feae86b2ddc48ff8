"""Has this tenant asked exactly this before? Serves it from the tenant's response cache.

Mounted inside the metering layer (a cached answer is recorded, with outcome ``cached``,
billed by ``metering.billing``) and outside quota, admission and breaker (a cached answer
uses no upstream capacity, so it takes none).

For a tenant that did not opt in, or a model it did not opt in for, the layer reads one
attribute of the tenant and passes the request on untouched. For the others:

- the canonical request (``cache.key``) is digested with the tenant's own lookup key, so
  two tenants' identical requests never share an entry;
- a live entry is opened with the tenant's data key and sent back as it was first sent
  (a stream as its SSE events), with ``x-tenantware-cache: hit``;
- otherwise the answer passes through as usual (``x-tenantware-cache: miss``); a complete
  200 answer whose request ended ``ok`` is sealed and kept for the tenant's TTL, within its
  byte quota (the store evicts the tenant's own oldest entries, or refuses: the request
  never fails for the cache's sake);
- ``Cache-Control: no-cache`` skips the lookup (the fresh answer is kept); ``no-store``
  skips the cache entirely.

A store or key outage turns the cache off for the request, never into an error (a Redis
store's calls are bounded by its client's outage rule; the entry is kept after the answer was
sent, so a slow store delays nothing the client waits for).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Final

import msgspec
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.cache import CachedAnswer, CacheStore, cache_key, canonical_request
from tenantware.cache.entry import decode_answer, encode_answer
from tenantware.context import Outcome, RequestContext, context_of
from tenantware.crypto import KeyRing, MissingMasterKey, TenantKeys, Undecryptable
from tenantware.registry import TenantView
from tenantware.state import LiveConfig
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CACHE_HEADER", "CacheMiddleware"]

CACHE_HEADER: Final = b"x-tenantware-cache"
#: Where cached answers are said to come from (``upstream`` of the usage record).
CACHE_UPSTREAM: Final = "cache"
_HIT: Final = (CACHE_HEADER, b"hit")
_MISS: Final = (CACHE_HEADER, b"miss")
_BYPASS: Final = (CACHE_HEADER, b"bypass")
_KEY_ERRORS: Final[tuple[type[Exception], ...]] = (MissingMasterKey, *STORE_UNAVAILABLE)
_log = structlog.get_logger("tenantware.cache")


class CacheMiddleware:
    """Pure ASGI: ``CacheMiddleware(app, live=live, store=MemoryCacheStore(), keyring=ring)``."""

    def __init__(
        self, app: ASGIApp, *, live: LiveConfig, store: CacheStore, keyring: KeyRing
    ) -> None:
        self.app = app
        self.live = live
        self.store = store
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope) if scope["type"] == "http" else None
        tenant = ctx.tenant if ctx is not None else None
        if tenant is None or tenant.cache_models is None:
            await self.app(scope, receive, send)
            return
        assert ctx is not None
        model = ctx.model
        if model is None or not ctx.body or not tenant.caches(model):
            await self.app(scope, receive, send)
            return
        directive = _directive(scope)
        canonical = canonical_request(scope["path"], model, ctx.body)
        keys = await self._keys(tenant) if canonical is not None else None
        if canonical is None or keys is None or directive == "no-store":
            await self.app(scope, receive, _tagged(send, _BYPASS))
            return
        key = cache_key(keys, canonical)
        if directive is None:
            answer = await self._lookup(tenant, keys, key)
            if answer is not None:
                await _replay(ctx, answer, send)
                return
        await self._answer_and_keep(scope, receive, send, ctx, tenant, keys, key, directive)

    async def _keys(self, tenant: TenantView) -> TenantKeys | None:
        keys = self.keyring.cached(tenant.id)
        if keys is not None:
            return keys
        try:
            return await self.keyring.keys(tenant.id)
        except _KEY_ERRORS as exc:
            _log.warning("cache_keys_unavailable", tenant_id=tenant.id, error=str(exc))
            return None

    async def _lookup(self, tenant: TenantView, keys: TenantKeys, key: str) -> CachedAnswer | None:
        try:
            sealed = await self.store.get(tenant.id, key)
        except STORE_UNAVAILABLE as exc:
            _log.warning("cache_unavailable", tenant_id=tenant.id, error=str(exc))
            return None
        if sealed is None:
            return None
        try:
            return decode_answer(keys.open(sealed))
        except (Undecryptable, msgspec.DecodeError, msgspec.ValidationError):
            # Sealed under a master key no longer provided, or not this tenant's: a miss.
            return None

    async def _answer_and_keep(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext,
        tenant: TenantView,
        keys: TenantKeys,
        key: str,
        directive: str | None,
    ) -> None:
        limit = self.live.current.config.data.max_cached_bytes
        parts: list[bytes] = []
        size = 0
        status = 0
        content_type = b""
        complete = False
        header = _MISS if directive is None else _BYPASS

        def keeping_send(message: Message) -> Awaitable[None]:
            nonlocal size, status, content_type, complete
            if message["type"] == "http.response.body":
                if status == 200 and size <= limit:
                    body = message.get("body", b"")
                    size += len(body)
                    parts.append(body)
                    complete = not message.get("more_body", False)
            elif message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        content_type = value
                message["headers"] = [*message.get("headers", ()), header]
            return send(message)

        await self.app(scope, receive, keeping_send)
        if not complete or size > limit or ctx.outcome not in (None, Outcome.OK):
            return
        answer = CachedAnswer(
            status=status,
            content_type=content_type,
            body=b"".join(parts),
            stream=b"event-stream" in content_type,
            model_served=ctx.model_served,
            usage=ctx.usage,
            created_at=time.time(),
        )
        sealed = keys.seal(encode_answer(answer))
        data = tenant.data
        try:
            await self.store.put(
                tenant.id, key, sealed, ttl_s=data.cache_ttl_s, quota_bytes=data.cache_quota_bytes
            )
        except STORE_UNAVAILABLE as exc:
            _log.warning("cache_unavailable", tenant_id=tenant.id, error=str(exc))


def _directive(scope: Scope) -> str | None:
    """``no-store``, ``no-cache`` or ``None`` from the client's ``Cache-Control``."""
    for name, value in scope["headers"]:
        if name == b"cache-control":
            words = {word.strip() for word in value.lower().split(b",")}
            if b"no-store" in words:
                return "no-store"
            if b"no-cache" in words:
                return "no-cache"
    return None


def _tagged(send: Send, header: tuple[bytes, bytes]) -> Send:
    def tagged_send(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        return send(message)

    return tagged_send


async def _replay(ctx: RequestContext, answer: CachedAnswer, send: Send) -> None:
    """Send a cached answer as it was first sent: a stream event by event."""
    ctx.outcome = Outcome.CACHED
    ctx.upstream = CACHE_UPSTREAM
    ctx.usage = answer.usage
    ctx.model_served = answer.model_served
    age = str(max(0, int(time.time() - answer.created_at))).encode()
    headers = [(b"content-type", answer.content_type), _HIT, (b"age", age)]
    if not answer.stream:
        headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})
        return
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    ctx.first_byte_at = time.perf_counter()
    body = answer.body
    start = 0
    while start < len(body):
        end = body.find(b"\n\n", start)
        end = len(body) if end < 0 else end + 2
        await send({"type": "http.response.body", "body": body[start:end], "more_body": True})
        start = end
    await send({"type": "http.response.body", "body": b"", "more_body": False})
