"""The dashboard: a web page served by the gateway (``/dashboard``) and the JSON it reads
(``/admin/dashboard/usage``, ``/admin/dashboard/live``), for tenants and operators."""

from __future__ import annotations

from tenantware.dashboard.app import (
    DASHBOARD_API_PREFIX,
    DASHBOARD_PATH,
    DashboardApp,
    is_dashboard_path,
)
from tenantware.dashboard.live import LiveSources
from tenantware.dashboard.schemas import LiveView, UsageView

__all__ = [
    "DASHBOARD_API_PREFIX",
    "DASHBOARD_PATH",
    "DashboardApp",
    "LiveSources",
    "LiveView",
    "UsageView",
    "is_dashboard_path",
]
