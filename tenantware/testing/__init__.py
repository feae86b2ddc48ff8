"""Test helpers for tenantware users: a fake OpenAI upstream and a thread server.

Names are imported lazily so that ``python -m tenantware.testing.upstream`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenantware.testing.serve import serve_in_thread
    from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig, count_prompt_tokens

__all__ = ["FakeUpstream", "FakeUpstreamConfig", "count_prompt_tokens", "serve_in_thread"]

_HOMES = {
    "FakeUpstream": "tenantware.testing.upstream",
    "FakeUpstreamConfig": "tenantware.testing.upstream",
    "count_prompt_tokens": "tenantware.testing.upstream",
    "serve_in_thread": "tenantware.testing.serve",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tenantware.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
