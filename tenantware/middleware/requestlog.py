"""Should this exchange be kept? Logs a tenant's requests and answers, sealed with its key.

Only for tenants whose data policy says ``log_requests`` (off by default); for every other
request the layer reads one attribute and passes it on. Mounted just inside the tenant layer,
so what it keeps carries the final outcome (metering sets it) and cached answers too.

The answer is copied as it passes (up to ``max_logged_bytes``, then marked truncated); once
the response is complete the exchange is sealed with the tenant's data key and stored with
its retention. A full log quota, a store or key outage skip the entry (with a warning):
logging never fails or delays a request's answer.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from typing import Final

import anyio
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.context import context_of
from tenantware.crypto import KeyRing, MissingMasterKey
from tenantware.logbook import LoggedExchange, LogStore, seal_row
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestLogMiddleware"]

_DAY_S: Final = 86_400.0
_STORE_TIMEOUT_S: Final = 5.0
_ERRORS: Final[tuple[type[Exception], ...]] = (MissingMasterKey, *STORE_UNAVAILABLE)
_log = structlog.get_logger("tenantware.requestlog")


class RequestLogMiddleware:
    """Pure ASGI: ``RequestLogMiddleware(app, store=MemoryLogStore(), keyring=ring)``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: LogStore,
        keyring: KeyRing,
        max_logged_bytes: int = 1024 * 1024,
    ) -> None:
        self.app = app
        self.store = store
        self.keyring = keyring
        self.max_logged_bytes = max_logged_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope) if scope["type"] == "http" else None
        tenant = ctx.tenant if ctx is not None else None
        if tenant is None or not tenant.data.log_requests:
            await self.app(scope, receive, send)
            return
        assert ctx is not None
        limit = self.max_logged_bytes
        parts: list[bytes] = []
        size = 0
        truncated = False

        def logging_send(message: Message) -> Awaitable[None]:
            nonlocal size, truncated
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                room = limit - size
                if len(body) > room:
                    truncated = True
                    body = body[: max(room, 0)]
                if body:
                    parts.append(body)
                    size += len(body)
            return send(message)

        await self.app(scope, receive, logging_send)
        exchange = LoggedExchange(
            request_id=ctx.request_id,
            ts=ctx.unix_time,
            path=scope["path"],
            model=ctx.model or "",
            status=ctx.status,
            outcome=ctx.outcome or "",
            request=ctx.body,
            response=b"".join(parts),
            truncated=truncated,
        )
        try:
            with anyio.fail_after(_STORE_TIMEOUT_S, shield=True):
                keys = await self.keyring.keys(tenant.id)
                assert keys is not None
                row = seal_row(
                    keys,
                    exchange,
                    row_id="log_" + secrets.token_hex(12),
                    retention_s=tenant.data.log_retention_days * _DAY_S,
                )
                stored = await self.store.append(row, quota_bytes=tenant.data.log_quota_bytes)
        except _ERRORS as exc:
            _log.warning("request_log_unavailable", tenant_id=tenant.id, error=str(exc))
            return
        if not stored:
            _log.warning("request_log_quota_full", tenant_id=tenant.id)
