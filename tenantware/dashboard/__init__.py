"""The dashboard: a web page served by the gateway (``/dashboard``) and the JSON it reads
(``/admin/dashboard/usage``, ``/admin/dashboard/live``, ``/admin/dashboard/migration``), for
tenants and operators."""

from __future__ import annotations

from tenantware.dashboard.app import (
    DASHBOARD_API_PREFIX,
    DASHBOARD_PATH,
    DashboardApp,
    is_dashboard_path,
)
from tenantware.dashboard.live import LiveSources
from tenantware.dashboard.migration import MigrationSource
from tenantware.dashboard.schemas import LiveView, MigrationView, UsageView

__all__ = [
    "DASHBOARD_API_PREFIX",
    "DASHBOARD_PATH",
    "DashboardApp",
    "LiveSources",
    "LiveView",
    "MigrationSource",
    "MigrationView",
    "UsageView",
    "is_dashboard_path",
]
