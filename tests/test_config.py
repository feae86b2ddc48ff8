"""Configuration: formats, clear errors, tier merging, and reload without restart."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from tenantware import ConfigError, KeyHasher, load_config, parse_config
from tenantware.registry import MemoryTenantRegistry
from tenantware.reload import reload_from, watch_config
from tenantware.state import LiveConfig

TOML = """
[[tenants]]
id = "acme"
tier = "pro"
[tenants.limits]
requests_per_minute = 5
daily_budget_usd = 0.30
[[tenants.keys]]
id = "k1"
hash = "{hash}"

[models."gemini-2.5-flash"]
input_per_mtok = 0.30
output_per_mtok = "2.50"

[aliases]
flash = "gemini-2.5-flash"
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_yaml_and_json_load_the_same_config(tmp_path: Path) -> None:
    hashed = KeyHasher().hash("sk-1")
    from_toml = load_config(_write(tmp_path, "c.toml", TOML.format(hash=hashed)))
    as_dict = {
        "tenants": [
            {
                "id": "acme",
                "tier": "pro",
                "limits": {"requests_per_minute": 5, "daily_budget_usd": "0.30"},
                "keys": [{"id": "k1", "hash": hashed}],
            }
        ],
        "models": {"gemini-2.5-flash": {"input_per_mtok": 0.30, "output_per_mtok": "2.50"}},
        "aliases": {"flash": "gemini-2.5-flash"},
    }
    from_json = load_config(_write(tmp_path, "c.json", json.dumps(as_dict)))
    yaml_text = json.dumps(as_dict)  # JSON is valid YAML
    from_yaml = load_config(_write(tmp_path, "c.yaml", yaml_text))
    assert from_toml == from_json == from_yaml
    assert from_toml.tenants[0].limits.daily_budget_usd == Decimal("0.30")
    assert from_toml.catalogue()["gemini-2.5-flash"].input_per_mtok == Decimal("0.3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[tenants]]\nid = "a"\n[tenants.limits]\nrequests_per_minute = "x"\n',
            "$.tenants[0].limits",
        ),
        ('[[tenants]]\nid = "a"\nbogus = 1\n', "unknown field `bogus`"),
        ('[[tenants]]\nid = "a"\ntier = "gold"\n', "unknown tier 'gold'"),
        (
            '[[tenants]]\nid = "a"\n[tenants.limits]\nrequests_per_minute = 0\n',
            "$.tenants[0].limits",
        ),
        ("[models.x]\ninput_per_mtok = -1\n", "non-negative"),
        ('[aliases]\nfoo = "nope"\n', "unknown model 'nope'"),
        ('[[upstreams]]\nname = "u"\nbase_url = "ftp://x"\n', "$.upstreams[0].base_url"),
        ("x =", "cannot parse"),
    ],
)
def test_bad_config_names_the_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_file_and_unknown_format_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unsupported config format"):
        load_config(_write(tmp_path, "c.ini", "[x]"))


def test_tenant_limits_override_tier_defaults_field_by_field() -> None:
    config = parse_config(
        {
            "tiers": {
                "pro": {
                    "weight": 0.4,
                    "limits": {"requests_per_minute": 100, "tokens_per_minute": 9},
                }
            },
            "tenants": [{"id": "a", "tier": "pro", "limits": {"requests_per_minute": 7}}],
        }
    )
    tenant = MemoryTenantRegistry(config).by_id("a")
    assert tenant is not None
    assert tenant.limits.requests_per_minute == 7
    assert tenant.limits.tokens_per_minute == 9
    assert tenant.weight == 0.4


def test_upstream_key_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(
        {"upstreams": [{"name": "o", "base_url": "https://x/v1", "api_key_env": "TW_UP_KEY"}]}
    )
    assert config.upstreams[0].api_key() is None
    monkeypatch.setenv("TW_UP_KEY", "sk-upstream")
    assert config.upstreams[0].api_key() == "sk-upstream"
    with pytest.raises(ConfigError):
        parse_config(
            {"upstreams": [{"name": "o", "base_url": "https://x", "api_key": "sk-inline"}]}
        )


def test_reload_swaps_valid_config_and_keeps_old_on_error(tmp_path: Path) -> None:
    first, second = KeyHasher().hash("sk-first"), KeyHasher().hash("sk-second")
    path = _write(tmp_path, "c.toml", TOML.format(hash=first))
    live = LiveConfig(load_config(path))
    assert live.current.registry.by_key_hash(first) is not None

    path.write_text("this is [not toml")
    assert reload_from(live, path) is False
    assert live.current.registry.by_key_hash(first) is not None

    path.write_text(TOML.format(hash=second))
    assert reload_from(live, path) is True
    assert live.current.registry.by_key_hash(first) is None
    assert live.current.registry.by_key_hash(second) is not None
    assert live.current.version == 2


@pytest.mark.anyio
async def test_file_watch_picks_up_changes_without_restart(tmp_path: Path) -> None:
    first, second = KeyHasher().hash("sk-first"), KeyHasher().hash("sk-second")
    path = _write(tmp_path, "c.toml", TOML.format(hash=first))
    live = LiveConfig(load_config(path))
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: watch_config(live, path, interval_s=0.02))
        await anyio.sleep(0.05)
        path.write_text(TOML.format(hash=second) + "\n# changed\n")
        with anyio.fail_after(5):
            while live.current.registry.by_key_hash(second) is None:
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
    assert live.current.registry.by_key_hash(first) is None
