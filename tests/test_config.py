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


# -- references that point nowhere are load errors -------------------------------------------

_UPSTREAM = {"name": "openai", "base_url": "https://api.openai.test/v1", "models": ["gpt-4.1"]}


def _with(**sections: object) -> dict[str, object]:
    """One tenant ``acme`` (tier pro) on one upstream ``openai``, plus ``sections``."""
    return {"tenants": [{"id": "acme", "tier": "pro"}], "upstreams": [_UPSTREAM], **sections}


@pytest.mark.parametrize(
    ("data", "setting", "unknown"),
    [
        (_with(admission={"upstream_seats": {"opena1": 4}}), "admission.upstream_seats", "opena1"),
        (
            _with(admission={"upstream_tokens_per_second": {"azure": 1000}}),
            "admission.upstream_tokens_per_second",
            "azure",
        ),
        (
            _with(admission={"tenant_reserved_seats": {"acne": 2}}),
            "admission.tenant_reserved_seats",
            "acne",
        ),
        (
            _with(admission={"tier_reserved_seats": {"gold": 2}}),
            "admission.tier_reserved_seats",
            "gold",
        ),
        (_with(admission={"tier_max_seats": {"gold": 2}}), "admission.tier_max_seats", "gold"),
        (
            _with(quota={"tenant_model_limits": {"acne": {"gpt-4.1": {"tokens_per_minute": 5}}}}),
            "quota.tenant_model_limits",
            "acne",
        ),
        (
            _with(quota={"tenant_model_limits": {"acme": {"gpt-4.2": {"tokens_per_minute": 5}}}}),
            "quota.tenant_model_limits.acme",
            "gpt-4.2",
        ),
        (
            _with(quota={"model_limits": {"gpt-4.2": {"tokens_per_minute": 5}}}),
            "quota.model_limits",
            "gpt-4.2",
        ),
        (
            _with(breaker={"fallbacks": {"gpt-4.1": ["claude-sonet-4.5"]}}),
            "breaker.fallbacks.gpt-4.1",
            "claude-sonet-4.5",
        ),
        (
            {"tenants": [{"id": "acme", "allowed_models": ["gpt-4.2"]}]},
            "tenants[0].allowed_models",
            "gpt-4.2",
        ),
    ],
)
def test_a_reference_to_nothing_is_a_load_error_naming_the_setting(
    data: dict[str, object], setting: str, unknown: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert f"`{setting}`" in message
    assert repr(unknown) in message


def test_the_error_lists_the_names_that_do_exist() -> None:
    with pytest.raises(ConfigError, match=r"upstreams: 'openai'\)"):
        parse_config(_with(admission={"upstream_seats": {"opena1": 4}}))


def test_references_that_exist_load() -> None:
    config = parse_config(
        _with(
            aliases={"gpt4": "gpt-4.1"},
            admission={
                "upstream_seats": {"openai": 4},
                "upstream_tokens_per_second": {"openai": 1000},
                "tenant_reserved_seats": {"acme": 1},
                "tier_reserved_seats": {"pro": 1},
                "tier_max_seats": {"free": 1},
            },
            quota={
                "model_limits": {"gpt4": {"tokens_per_minute": 5}},
                "tenant_model_limits": {"acme": {"gpt-4.1": {"tokens_per_minute": 5}}},
            },
            breaker={"fallbacks": {"claude-sonnet-4.5": ["gpt4"]}},
        )
    )
    assert config.admission.upstream_seats == {"openai": 4}


def test_a_fallback_that_no_upstream_serves_is_a_load_error() -> None:
    with pytest.raises(ConfigError, match=r"`breaker.fallbacks.gpt-4.1`: no upstream serves"):
        parse_config(_with(breaker={"fallbacks": {"gpt-4.1": ["deepseek-v3.2"]}}))


def test_an_upstream_model_without_a_price_is_a_load_error() -> None:
    upstream = {**_UPSTREAM, "models": ["gpt-4.1", "my-finetune"]}
    with pytest.raises(ConfigError) as caught:
        parse_config({"upstreams": [upstream]})
    message = str(caught.value)
    assert "`upstreams[0].models`" in message
    assert "'my-finetune' has no price" in message
    assert '[models."my-finetune"]' in message


@pytest.mark.anyio
async def test_a_model_priced_at_zero_on_purpose_is_served_and_billed_zero() -> None:
    from tests.support import CHAT, KEYS, client_for, in_process_gateway, make_config

    config = make_config(
        upstreams=[
            {"name": "fake", "base_url": "http://upstream.test/v1", "models": ["my-finetune"]}
        ],
        models={"my-finetune": {}},
    )
    gateway, _ = in_process_gateway(config=config)
    async with gateway.running(), client_for(gateway.asgi_app(), KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "model": "my-finetune"})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["total_tokens"] > 0
    assert gateway.live.current.catalogue.price("my-finetune") is not None
    records = await gateway.ledger.query(tenant="acme")  # type: ignore[union-attr]
    assert [(record.model_served, record.cost_nanousd) for record in records] == [
        ("my-finetune", 0)
    ]


@pytest.mark.anyio
async def test_store_urls_take_their_secrets_from_the_environment(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from urllib.parse import urlsplit

    from tenantware import Gateway
    from tests.support import make_config

    parts = urlsplit(redis_url)
    monkeypatch.setenv("TW_TEST_REDIS_ADDRESS", parts.netloc)
    settings = {
        "redis_url": f"{parts.scheme}://${{TW_TEST_REDIS_ADDRESS}}{parts.path}",
        "registry_url": f"{parts.scheme}://${{TW_TEST_REDIS_ADDRESS}}{parts.path}",
        "redis_prefix": redis_prefix,
    }
    config = make_config(gateway=settings)
    # The loaded configuration keeps the reference, never the secret.
    assert "${TW_TEST_REDIS_ADDRESS}" in (config.gateway.redis_url or "")
    gateway = Gateway(config)
    async with gateway.running():
        assert gateway.redis is not None
        assert await gateway.redis.ping()
        assert {tenant.id for tenant in gateway.live.current.config.tenants} >= {"acme"}
    monkeypatch.delenv("TW_TEST_REDIS_ADDRESS")
    with pytest.raises(ConfigError, match=r"gateway\.redis_url: environment variable"):
        Gateway(config)


def test_an_unset_variable_in_the_ledger_url_names_the_setting_not_the_value() -> None:
    from tenantware import Gateway
    from tests.support import make_config

    config = make_config(metering={"ledger_url": "postgresql://tw:${TW_TEST_UNSET_PW}@db/x"})
    with pytest.raises(ConfigError) as raised:
        Gateway(config)
    assert (
        str(raised.value) == "metering.ledger_url: environment variable TW_TEST_UNSET_PW is not set"
    )
