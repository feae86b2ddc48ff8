"""Who is calling? Resolves the tenant from its API key, reads and decodes the body once.

Outermost layer: it creates the request context every other layer reads, echoes the request
id, and rejects unknown keys (401), oversized bodies (413), malformed JSON (400), unknown
models (404) and models the tenant may not use (403) before any policy layer runs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from random import getrandbits as _getrandbits
from typing import Final
from urllib.parse import unquote

import msgspec
import structlog

from tenantware.context import SCOPE_KEY, Outcome, RequestContext, RequestView
from tenantware.errors import GatewayError, internal_error
from tenantware.estimate import PromptEstimator, estimate_prompt_tokens
from tenantware.registry import KeyEntry
from tenantware.state import LiveConfig, Snapshot
from tenantware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TenantMiddleware"]

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_bind = structlog.contextvars.bind_contextvars
_reset = structlog.contextvars.reset_contextvars
_VALID_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_decode_view = msgspec.json.Decoder(RequestView).decode
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
#: Routes of Anthropic's Messages API and of the Responses API (``ctx.wire_format``).
_OTHER_FORMAT_PATHS: Final = ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses")


def _invalid_key() -> GatewayError:
    # A new error each time: an exception raised again keeps every raise's frames (and the
    # request context in them) alive on its ``__traceback__``.
    return GatewayError(
        401,
        "Incorrect API key provided.",
        type="invalid_request_error",
        code="invalid_api_key",
        outcome=Outcome.REJECTED_AUTH,
    )


def _missing_key() -> GatewayError:
    return GatewayError(
        401,
        "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'.",
        type="invalid_request_error",
        code="invalid_api_key",
        outcome=Outcome.REJECTED_AUTH,
    )


def _new_request_id() -> str:
    # 96 random bits, as before, from the process PRNG (seeded from the OS at start-up): an
    # id must be unique, not secret, and os.urandom() is a getrandom syscall per request.
    return f"req_{_getrandbits(96):024x}"


def _bad_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> GatewayError:
    return GatewayError(
        400,
        message,
        type="invalid_request_error",
        param=param,
        code=code,
        outcome=Outcome.REJECTED_REQUEST,
    )


def _param_of(error: msgspec.ValidationError) -> str | None:
    # msgspec ends its messages with "- at `$.field...`".
    text = str(error)
    marker = "- at `$."
    at = text.rfind(marker)
    return text[at + len(marker) : -1].split(".")[0].split("[")[0] if at >= 0 else None


class TenantMiddleware:
    """Pure ASGI: ``TenantMiddleware(app, live=LiveConfig(config))``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        live: LiveConfig,
        estimator: PromptEstimator = estimate_prompt_tokens,
        on_rejected: Callable[[Scope], None] | None = None,
        on_refusal: Callable[[RequestContext, GatewayError], Awaitable[GatewayError]] | None = None,
    ) -> None:
        self.app = app
        self.live = live
        self.estimator = estimator
        #: Called after this layer itself refused a request (bad body, model): the metering
        #: layer is not reached then, so the gateway records those here.
        self.on_rejected = on_rejected
        #: Called before this layer refuses a known tenant's request, with the refusal; sends
        #: what it returns. The breaker layer is not reached either: the gateway counts these
        #: refusals against the tenant's circuit here (a paused tenant gets its pause).
        self.on_refusal = on_refusal
        self._trusted: tuple[Snapshot | None, tuple[_IPNetwork, ...]] = (None, ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        snapshot = self.live.current
        token = host = incoming_id = content_type = None
        content_length = -1
        many_hosts = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                if value[:7].lower() == b"bearer ":
                    token = value[7:].strip()
            elif name == b"x-api-key" or name == b"api-key":
                token = token or value.strip()
            elif name == b"host":
                many_hosts = host is not None
                host = value
            elif name == b"x-request-id":
                incoming_id = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length" and value.isdigit():
                content_length = int(value)

        if incoming_id is not None and _VALID_REQUEST_ID.fullmatch(incoming_id):
            request_id = incoming_id.decode()
        else:
            request_id = _new_request_id()
        ctx = RequestContext(request_id)
        scope[SCOPE_KEY] = ctx
        id_header = (b"x-request-id", request_id.encode())

        def send_with_id(message: Message) -> Awaitable[None]:
            # A plain function returning ``send``'s awaitable: no coroutine per message.
            if message["type"] == "http.response.start":
                ctx.response_started = True
                ctx.status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            return send(message)

        raw_path = scope.get("raw_path")
        if many_hosts or (raw_path and not raw_path.startswith(b"/")):
            refusal = _check_target(scope, raw_path, host, many_hosts)
            if refusal is not None:
                await refusal.send(send_with_id, ctx)
                return
        if not scope["path"].startswith(snapshot.api_prefixes):
            await self.app(scope, receive, send_with_id)
            return
        ctx.api_route = True
        if scope["path"].endswith(_OTHER_FORMAT_PATHS):
            # Anthropic's Messages API (and count_tokens): refusals speak its error format;
            # the Responses API: translated for chat-only upstreams.
            path = scope["path"]
            ctx.wire_format = "responses" if path.endswith("/responses") else "anthropic"
        # bind/reset with tokens: ``bound_contextvars`` copies the whole context per call.
        id_token = _bind(request_id=request_id)
        tenant_token = None
        inner_called = False
        try:
            entry = self._authenticate(snapshot, scope, token, host)
            ctx.tenant = entry.tenant
            ctx.key_id = entry.key_id
            tenant_token = _bind(tenant_id=entry.tenant.id)
            if scope["method"] in _BODY_METHODS and _is_json(content_type):
                replay = await self._read_body(snapshot, ctx, receive, content_length)
                if replay is None:
                    return  # the client left before its body: nothing to answer
                receive = replay
            inner_called = True
            await self.app(scope, receive, send_with_id)
        except GatewayError as error:
            # This layer's own refusal; or, from an app in a stack without the breaker and
            # quota layers (which answer it), the app's answer.
            if ctx.response_started:
                raise
            if not inner_called and self.on_refusal is not None and ctx.tenant is not None:
                error = await self.on_refusal(ctx, error)
            await error.send(send_with_id, ctx)
            if not inner_called and self.on_rejected is not None:
                self.on_rejected(scope)
        except Exception:
            # A stray exception (a bug below): an OpenAI-shaped 500 if nothing was sent, then
            # on to the server, which logs it (as Starlette's ServerErrorMiddleware does).
            if not ctx.response_started:
                await internal_error().send(send_with_id, ctx)
            raise
        finally:
            if tenant_token is not None:
                _reset(**tenant_token)
            _reset(**id_token)

    def _authenticate(
        self, snapshot: Snapshot, scope: Scope, token: bytes | None, host: bytes | None
    ) -> KeyEntry:
        if not token:
            raise _missing_key()
        entry = snapshot.registry.by_key_hash(snapshot.hasher.hash(token))
        if entry is None:
            raise _invalid_key()
        if snapshot.domain_owner or entry.tenant.domains:
            trusted = self._trusted_proxies(snapshot)
            if trusted and _from(scope, trusted):
                host = _header(scope, b"x-forwarded-host", host)
            domain = _normal_host(host)
            owner = snapshot.domain_owner.get(domain)
            if owner is not None and owner != entry.tenant.id:
                raise _invalid_key()
            if entry.tenant.domains and domain not in entry.tenant.domains:
                raise _invalid_key()
        return entry

    def _trusted_proxies(self, snapshot: Snapshot) -> tuple[_IPNetwork, ...]:
        """The networks of ``gateway.trusted_proxies``, parsed once per config version."""
        cached = self._trusted
        if cached[0] is not snapshot:
            entries = snapshot.config.gateway.trusted_proxies
            cached = self._trusted = (
                snapshot,
                tuple(ipaddress.ip_network(entry, strict=False) for entry in entries),
            )
        return cached[1]

    async def _read_body(
        self, snapshot: Snapshot, ctx: RequestContext, receive: Receive, content_length: int
    ) -> Receive | None:
        """The body read whole and decoded; a ``receive`` replaying it (``None``: the client
        left before sending it all)."""
        limit = snapshot.max_body_bytes
        if content_length > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                ctx.outcome = Outcome.CLIENT_DISCONNECTED
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        ctx.body = body
        if body:
            self._decode(snapshot, ctx, body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _decode(self, snapshot: Snapshot, ctx: RequestContext, body: bytes) -> None:
        try:
            view = _decode_view(body)
        except msgspec.ValidationError as exc:
            raise _bad_request(f"Invalid request body: {exc}", param=_param_of(exc)) from None
        except msgspec.DecodeError:
            raise _bad_request(
                "We could not parse the JSON body of your request. The body must be valid JSON."
            ) from None
        except RecursionError:
            # The decoder's depth bound (the interpreter's recursion limit): no real request
            # comes near it, and a few KB of brackets must not cost a 500.
            raise _bad_request(
                "The JSON body of your request is nested too deeply.", code="json_too_deep"
            ) from None
        ctx.view = view
        ctx.estimated_prompt_tokens = self.estimator(body, view)
        if view.model is None:
            return
        tenant = ctx.tenant
        assert tenant is not None
        catalogue = snapshot.catalogue
        requested = view.model
        if tenant.aliases:
            requested = tenant.aliases.get(requested, requested)
        model = catalogue.resolve(requested)
        if model is None:
            if not catalogue.models:
                ctx.model = view.model
                return
            raise GatewayError(
                404,
                f"The model `{view.model}` does not exist or you do not have access to it.",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
                outcome=Outcome.REJECTED_REQUEST,
            )
        if not tenant.may_use(model):
            raise GatewayError(
                403,
                f"This API key is not allowed to use the model `{view.model}`.",
                type="invalid_request_error",
                param="model",
                code="model_not_allowed",
                outcome=Outcome.REJECTED_REQUEST,
            )
        ctx.model = model


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
        outcome=Outcome.REJECTED_REQUEST,
    )


def _normal_host(value: bytes | None) -> str:
    """A ``Host`` value as domain binding compares it: lower case, no port, no trailing dot
    (``AI.Acme.Example.:443`` is ``ai.acme.example``); IPv6 literals keep their brackets."""
    if not value:
        return ""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    name, colon, port = host.rpartition(":")
    if colon and (not port or port.isdigit()):
        host = name
    return host.rstrip(".")


def _check_target(
    scope: Scope, raw_path: bytes | None, host: bytes | None, many_hosts: bool
) -> GatewayError | None:
    """Refuse a request whose host is ambiguous: several ``Host`` headers, or an absolute-form
    URL naming another host than ``Host`` (either could pass one host to a proxy in front and
    another to domain binding). An agreeing absolute-form URL is served by its path."""
    if many_hosts:
        return _bad_request("The request has several Host headers.", code="invalid_host")
    assert raw_path is not None
    scheme, sep, rest = raw_path.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None  # "*" (OPTIONS) or not a URL: nothing to compare
    authority, slash, path = rest.partition(b"/")
    authority = authority.split(b"?", 1)[0].rpartition(b"@")[2]
    if _normal_host(authority) != _normal_host(host):
        return _bad_request(
            "The host of the request URL differs from its Host header.", code="invalid_host"
        )
    if not scope["path"].startswith("/"):
        # The server passed the absolute form on (h11 does): route by its path.
        path = (slash + path).split(b"?", 1)[0] or b"/"
        scope["path"] = unquote(path.decode("latin-1"))
        scope["raw_path"] = path
    return None


def _from(scope: Scope, networks: tuple[_IPNetwork, ...]) -> bool:
    """Whether the peer of this connection is in one of ``networks``."""
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:  # a unix socket path, say
        return False
    return any(address in network for network in networks)


def _header(scope: Scope, name: bytes, default: bytes | None) -> bytes | None:
    """The last value of header ``name`` (the one the nearest proxy set), else ``default``."""
    found = default
    for key, value in scope["headers"]:
        if key == name:
            found = value.rsplit(b",", 1)[-1]
    return found


def _is_json(content_type: bytes | None) -> bool:
    # The OpenAI SDKs always send JSON; a missing content type is treated as JSON too.
    return content_type is None or b"json" in content_type
