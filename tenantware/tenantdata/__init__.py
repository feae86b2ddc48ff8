"""Everything the gateway keeps of one tenant's data, as one unit: reading its logs,
forgetting it (crypto-shredding on deletion), exporting and restoring it."""

from __future__ import annotations

from tenantware.tenantdata.service import LogView, TenantData

__all__ = ["LogView", "TenantData"]
