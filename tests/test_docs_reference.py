"""The configuration reference covers the schema, and the guide builds with no warning."""

from __future__ import annotations

from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from tenantware.config import DEFAULT_TIERS, GatewayConfig
from tests.early_checks import Finished
from tools.config_reference import SECTIONS, render

ROOT = Path(__file__).resolve().parent.parent


def _structs(info: object, found: dict[type, None]) -> None:
    """Every Struct class reachable from ``info``, in the order met."""
    if isinstance(info, mi.StructType):
        if info.cls in found:
            return
        found[info.cls] = None
        for field in info.fields:
            _structs(field.type, found)
    for attribute in ("types", "item_type", "key_type", "value_type"):
        inner = getattr(info, attribute, None)
        for part in inner if isinstance(inner, tuple) else [inner] if inner else []:
            _structs(part, found)


def test_the_configuration_reference_covers_every_field_of_the_schema() -> None:
    structs: dict[type, None] = {}
    _structs(mi.type_info(GatewayConfig), structs)
    assert set(structs) == {cls for cls, _ in SECTIONS}, "a struct of the schema has no section"
    page = render()
    for cls in structs:
        section = page[page.index(f"## {cls.__name__}\n") :]
        section = section[: section.index("\n## ")]
        assert issubclass(cls, msgspec.Struct)
        for name in cls.__struct_fields__:
            assert f"| `{name}` |" in section, f"{cls.__name__}.{name} is not in the reference"


def test_the_reference_lists_the_built_in_tiers_as_they_are() -> None:
    page = render()
    for name, tier in DEFAULT_TIERS.items():
        limits = tier.limits
        row = (
            f"| `{name}` | {tier.weight:g} | {tier.max_priority} | "
            f"{limits.requests_per_minute:,} | {limits.tokens_per_minute:,} | "
            f"{limits.burst_multiplier:g}x | {tier.max_queue_wait_s:g} s |"
        )
        assert row in page, row


@pytest.mark.early_check("mkdocs")
def test_the_guide_builds_strictly(early_check: Finished) -> None:
    """``mkdocs build --strict``: a broken link, a missing page in the nav or an API
    reference to a name that does not exist fails it (the build runs from the session's
    start, ``tests/early_checks.py``)."""
    assert early_check.returncode == 0, early_check.stderr[-5000:]
    # The configuration reference is rendered from the schema by the build (tools/mkdocs_hooks.py).
    built = (early_check.output_dir / "reference" / "configuration" / "index.html").read_text()
    assert "max_queue_wait_s" in built
    assert "<code>replicas</code>" in built
