"""Key naming shared by every Redis store (no backend import: plans name keys ahead of use).

Every key of one tenant carries the tenant in a hash tag (``tw:{acme}:rpm``) so that all keys
a Lua script touches live in one slot and the scripts run unchanged on Redis Cluster.
"""

from __future__ import annotations

__all__ = ["tenant_key"]


def tenant_key(prefix: str, tenant_id: str, *parts: str) -> str:
    """``{prefix}tw:{tenant}:part:part``: all keys of a tenant share one hash slot."""
    tail = ":".join(parts)
    return f"{prefix}tw:{{{tenant_id}}}:{tail}" if tail else f"{prefix}tw:{{{tenant_id}}}"
