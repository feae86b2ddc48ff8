"""``GET``/``DELETE /v1/responses/{id}``: stored responses, for the tenant that created them.

An upstream that serves the Responses API natively keeps the responses it answered. The
dispatcher records which tenant's request created each one (``tenantware.ownership``); here a
lookup or deletion is relayed to that upstream only for that tenant. Any other tenant gets the
404 an unknown id gets (never a 403: it must not learn that the id exists). Responses a
translating upstream answered were never stored anywhere, so they are unknown here too.
"""

from __future__ import annotations

import re
from typing import Final

import anyio
import structlog

from tenantware.backends.errors import STORE_UNAVAILABLE
from tenantware.breaker.board import RECORDED
from tenantware.context import Outcome, RequestContext, Usage
from tenantware.errors import GatewayError
from tenantware.ownership import OwnerStore
from tenantware.proxy.dispatch import Dispatcher, upstream_unavailable
from tenantware.proxy.relay import JSON_CONTENT_TYPE
from tenantware.proxy.upstream import UpstreamTooLarge, UpstreamUnavailable
from tenantware.types import Send

__all__ = ["STORED_PREFIX", "StoredResponses"]

log = structlog.get_logger("tenantware.proxy")

#: The path prefix (under ``/v1``) of stored responses.
STORED_PREFIX: Final = "/responses/"
_ID: Final = re.compile(r"[A-Za-z0-9_\-]{1,256}")
#: Sub-resources relayed, with the methods each accepts.
_METHODS: Final = {"": ("GET", "DELETE"), "/input_items": ("GET",)}


def _unknown(object_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"No response found with id '{object_id}'. Only responses answered through this "
        "gateway by an upstream that stores them (one serving the Responses API natively) "
        "can be read or deleted, and only with a key of the tenant that created them.",
        code="response_not_found",
        outcome=Outcome.REJECTED_REQUEST,
    )


class StoredResponses:
    """``await stored(ctx, send, method, path, query)`` for ``path`` under ``STORED_PREFIX``."""

    def __init__(self, dispatcher: Dispatcher, owners: OwnerStore) -> None:
        self.dispatcher = dispatcher
        self.owners = owners

    @staticmethod
    def serves(method: str, path: str) -> bool:
        """Whether this is a stored-response route (an id, an allowed sub-resource)."""
        if not path.startswith(STORED_PREFIX):
            return False
        object_id, slash, tail = path[len(STORED_PREFIX) :].partition("/")
        return method in _METHODS.get(slash + tail, ()) and bool(_ID.fullmatch(object_id))

    async def __call__(
        self, ctx: RequestContext, send: Send, method: str, path: str, query: bytes
    ) -> None:
        tenant = ctx.tenant
        assert tenant is not None
        object_id, slash, tail = path[len(STORED_PREFIX) :].partition("/")
        ctx.extra[RECORDED] = True  # no deployment's circuit hears of these calls
        try:
            owner = await self.owners.owner(object_id)
        except STORE_UNAVAILABLE:
            raise GatewayError(
                503,
                "The gateway cannot look up stored responses right now; try again shortly.",
                type="server_error",
                code="store_unavailable",
                outcome=Outcome.ERROR,
                should_retry=True,
            ) from None
        if owner is None or owner.tenant != tenant.id:
            raise _unknown(object_id)
        snapshot = self.dispatcher.live.current
        upstream = next((u for u in snapshot.config.upstreams if u.name == owner.upstream), None)
        if upstream is None or upstream.api != "openai" or not upstream.responses:
            raise GatewayError(
                400,
                f"The response '{object_id}' was answered by the upstream `{owner.upstream}`, "
                "which no longer serves the Responses API through this gateway: it cannot be "
                "read or deleted here.",
                code="response_not_stored",
                outcome=Outcome.REJECTED_REQUEST,
            )
        target = self.dispatcher.target(snapshot, upstream)
        url = f"{target.base_url}{STORED_PREFIX}{object_id}{slash}{tail}"
        if query:
            url += "?" + query.decode("latin-1")
        headers = {**target.headers, "x-request-id": ctx.request_id}
        ctx.upstream = upstream.name
        try:
            response = await self.dispatcher.client.request(
                method, url, headers=headers, body=b"", timeouts=target.whole_timeouts
            )
        except UpstreamUnavailable as exc:
            raise upstream_unavailable(exc, target) from None
        try:
            try:
                data = await response.read(upstream.max_response_bytes)
            except UpstreamUnavailable as exc:
                raise upstream_unavailable(exc, target) from None
            except UpstreamTooLarge as exc:
                raise GatewayError(
                    502,
                    f"The stored response is larger than the gateway relays ({exc.limit} bytes).",
                    type="server_error",
                    code="upstream_response_too_large",
                    outcome=Outcome.UPSTREAM_ERROR,
                ) from None
            status = response.status
            content_type = response.header("content-type")
        finally:
            closing = response.close_now()
            if closing is not None:
                with anyio.CancelScope(shield=True):
                    await closing
        if method == "DELETE" and (status < 300 or status == 404) and not tail:
            try:
                await self.owners.forget(object_id)
            except STORE_UNAVAILABLE:
                log.warning("stored response owner not forgotten", response_id=object_id)
        ctx.usage = Usage()
        ctx.outcome = Outcome.OK if status < 400 else Outcome.UPSTREAM_ERROR
        kind = (b"content-type", content_type.encode("latin-1")) if content_type else None
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    kind or JSON_CONTENT_TYPE,
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
