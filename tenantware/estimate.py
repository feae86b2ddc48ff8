"""Token estimation before the upstream has counted: fast, dependency-free, pluggable.

The estimate only sizes reservations and fair-queue charges; the upstream's real count
settles them afterwards, so a cheap rule (about four bytes of UTF-8 per token) is enough.
"""

from __future__ import annotations

from collections.abc import Callable

from tenantware.context import RequestView

__all__ = ["PromptEstimator", "estimate_prompt_tokens", "estimate_text_tokens"]

#: ``(body, view) -> tokens``: replace to plug in a real tokenizer.
PromptEstimator = Callable[[bytes, RequestView], int]


def estimate_text_tokens(n_bytes: int) -> int:
    """Tokens in ``n_bytes`` of text: one per four bytes, rounded up."""
    return (n_bytes + 3) // 4


def estimate_prompt_tokens(body: bytes, view: RequestView) -> int:
    """Prompt tokens of a request body: the body's size over four (JSON framing included,
    which slightly over-estimates: the safe side for a reservation)."""
    return estimate_text_tokens(len(body))
