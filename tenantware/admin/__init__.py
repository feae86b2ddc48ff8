"""The admin API (``/admin/``): tenants and keys at run time, roles, audit, OpenAPI."""

from __future__ import annotations

from tenantware.admin.app import AdminApi
from tenantware.admin.auth import AdminAuth, Caller

__all__ = ["AdminApi", "AdminAuth", "Caller"]
