"""Breaker settings: defaults, the guide's example, fallback chains checked at load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tenantware import ConfigError, parse_config


def test_defaults_follow_envoy_and_resilience4j() -> None:
    settings = parse_config({}).breaker
    assert settings.deployment.consecutive_failures == 5
    assert settings.deployment.failure_rate_percent == 50
    assert settings.deployment.open_wait_s == 30
    assert settings.deployment.max_open_wait_s == 300
    assert settings.tenant.consecutive_failures == 20


def test_the_guide_breaker_example_parses() -> None:
    page = Path(__file__).parent.parent.joinpath("docs", "circuits.md").read_text()
    section = page[page.index("## Settings") :]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    settings = parse_config(example.group(1)).breaker
    assert settings.fallbacks == {"claude-sonnet-4.5": ["gpt-4.1", "gemini-2.5-flash"]}


def test_fallback_to_an_unknown_model_is_rejected_at_load() -> None:
    with pytest.raises(ConfigError, match="unknown model 'gpt-9'"):
        parse_config({"breaker": {"fallbacks": {"gpt-4.1": ["gpt-9"]}}})


def test_fallbacks_may_name_aliases() -> None:
    config = parse_config(
        {"aliases": {"fast": "gemini-2.5-flash"}, "breaker": {"fallbacks": {"gpt-4.1": ["fast"]}}}
    )
    assert config.breaker.fallbacks["gpt-4.1"] == ["fast"]
