"""tenantware behaves as a library: importing it loads no backend; every public name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tenantware

ROOT = Path(__file__).resolve().parent.parent

#: What an app pays for only when it uses the part of tenantware that needs it.
BACKENDS = (
    "aiohttp",
    "httpx",
    "redis",
    "psycopg",
    "psycopg_pool",
    "prometheus_client",
    "cryptography",
)


def _loaded_after(code: str) -> list[str]:
    """The backends in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {BACKENDS!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_import_tenantware_loads_no_backend() -> None:
    assert _loaded_after("import tenantware") == []


def test_configuration_and_keys_load_no_backend() -> None:
    code = (
        "from tenantware import GatewayConfig, KeyHasher, parse_config, generate_key\n"
        "KeyHasher().hash(generate_key('tw'))\n"
        "parse_config({'tenants': [], 'upstreams': []})"
    )
    assert _loaded_after(code) == []


def test_a_backend_loads_when_its_name_is_used() -> None:
    assert "aiohttp" in _loaded_after("from tenantware import AiohttpUpstreamClient")


def test_every_public_name_resolves_to_its_home() -> None:
    for name in tenantware.__all__:
        home = importlib.import_module(tenantware._HOMES[name])
        assert getattr(tenantware, name) is getattr(home, name), name
    assert set(tenantware.__all__) == set(tenantware._HOMES)
    assert set(tenantware.__all__) <= set(dir(tenantware))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        tenantware.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_test_infrastructure_is_not_in_the_package() -> None:
    """The Redis/PostgreSQL process helpers live in tests/, outside the wheel; the fake
    upstream and serve_in_thread stay public."""
    import importlib.util

    import tenantware.testing

    assert importlib.util.find_spec("tenantware.testing.servers") is None
    assert {"FakeUpstream", "serve_in_thread"} <= set(tenantware.testing.__all__)
