"""Webhooks tenants register through the admin API: checked, stored, turned into destinations.

A registered webhook receives only its tenant's alerts and is signed with its own secret,
made here and shown once. Its URL must be http(s) and, unless
``alerts.allow_private_webhook_urls``, must not name a loopback, private, link-local or
otherwise internal address or ``localhost``: a tenant must not make the gateway call into its
own network. (A public name that resolves to an internal address is not caught here; put an
egress policy in front of the gateway for that.)
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from typing import Final, Literal
from urllib.parse import urlsplit

from tenantware.alerts.model import TenantWebhook
from tenantware.config import AlertDestination, AlertSettings

__all__ = ["WebhookRefused", "as_destination", "new_webhook"]

_MAX_URL: Final = 2048


class WebhookRefused(ValueError):
    """A registration that cannot be accepted; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _check_url(url: str, allow_private: bool) -> None:
    if len(url) > _MAX_URL:
        raise WebhookRefused(f"url is longer than {_MAX_URL} characters", "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("url must be an http(s) URL with a host", "url")
    if parts.username or parts.password:
        raise WebhookRefused("url must not carry credentials", "url")
    if allow_private:
        return
    host = parts.hostname
    if host == "localhost" or host.endswith(".localhost"):
        raise WebhookRefused("url must not name this host", "url")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if not address.is_global:
        raise WebhookRefused("url must not name a private or internal address", "url")


def new_webhook(
    settings: AlertSettings,
    tenant: str,
    url: str,
    *,
    existing: int,
    fmt: Literal["json", "slack"] = "json",
    min_severity: Literal["info", "warning", "critical"] = "info",
) -> TenantWebhook:
    """A new webhook of ``tenant`` (which has ``existing`` ones), or ``WebhookRefused``."""
    if not settings.tenant_webhooks:
        raise WebhookRefused("this gateway does not take tenants' webhooks", "url")
    if existing >= settings.max_tenant_webhooks:
        raise WebhookRefused(
            f"a tenant may register at most {settings.max_tenant_webhooks} webhooks", "url"
        )
    _check_url(url, settings.allow_private_webhook_urls)
    return TenantWebhook(
        id=f"wh_{secrets.token_hex(8)}",
        tenant=tenant,
        url=url,
        format=fmt,
        min_severity=min_severity,
        secret=f"whsec_{secrets.token_urlsafe(32)}",
        created_at=time.time(),
    )


def as_destination(webhook: TenantWebhook) -> tuple[AlertDestination, bytes]:
    """The destination a registered webhook stands for, and its signing secret."""
    destination = AlertDestination(
        id=webhook.id,
        url=webhook.url,
        tenant=webhook.tenant,
        format=webhook.format,
        min_severity=webhook.min_severity,
    )
    return destination, webhook.secret.encode()
