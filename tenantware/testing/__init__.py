"""Test helpers for tenantware users: a fake OpenAI upstream, a thread server, real services."""

from tenantware.testing.serve import serve_in_thread
from tenantware.testing.upstream import FakeUpstream, FakeUpstreamConfig, count_prompt_tokens

__all__ = ["FakeUpstream", "FakeUpstreamConfig", "count_prompt_tokens", "serve_in_thread"]
