"""The configuration reference page, rendered from the msgspec schema (tenantware/config.py).

Every field of every settings struct gets one row: its type with bounds, its default and the
``#:`` comment above it in config.py (or, for a field whose type is a struct, that struct's
docstring). MkDocs renders it at every build (tools/mkdocs_hooks.py), so it cannot drift from
the schema; tests/test_docs_reference.py checks that it covers every field.

    python -m tools.config_reference   # print the page
"""

from __future__ import annotations

import inspect
import re
import sys
from decimal import Decimal
from typing import Any

import msgspec
import msgspec.inspect as mi

from tenantware import config as schema

#: Where the page is in the guide (a generated page: no file in docs/).
PAGE_URI = "reference/configuration.md"

#: Where each struct appears in a file, in the order of the page.
SECTIONS: list[tuple[type[msgspec.Struct], list[str]]] = [
    (schema.GatewayConfig, ["(top level)"]),
    (schema.GatewaySettings, ["[gateway]"]),
    (schema.AdminKey, ["[[gateway.admin_keys]]"]),
    (schema.Tier, ["[tiers.NAME]"]),
    (schema.Tenant, ["[[tenants]]"]),
    (schema.ApiKey, ["[[tenants.keys]]"]),
    (
        schema.Limits,
        [
            "[tiers.NAME.limits]",
            "[tenants.limits]",
            "[quota.global_limits]",
            '[quota.model_limits."MODEL"]',
            '[quota.tenant_model_limits.TENANT."MODEL"]',
        ],
    ),
    (schema.Upstream, ["[[upstreams]]"]),
    (schema.ModelSpec, ['[models."MODEL"]']),
    (schema.QuotaSettings, ["[quota]"]),
    (schema.AdmissionSettings, ["[admission]"]),
    (schema.BreakerSettings, ["[breaker]"]),
    (schema.CircuitSettings, ["[breaker.deployment]", "[breaker.tenant]"]),
    (schema.MeteringSettings, ["[metering]"]),
    (schema.TenantPolicy, ["[tenants.policy]"]),
    (schema.UpstreamKey, ["[[tenants.policy.upstream_keys]]"]),
    (schema.PaymentWebhook, ['[gateway.payment_webhooks."NAME"]']),
    (schema.DataSettings, ["[data]"]),
    (schema.TenantData, ["[tenants.data]"]),
    (schema.AlertSettings, ["[alerts]"]),
    (schema.AlertRule, ["[[alerts.rules]]"]),
    (schema.AlertDestination, ["[[alerts.destinations]]"]),
    (schema.TracingSettings, ["[tracing]"]),
    (schema.MigrationSettings, ["[migration]"]),
    (schema.MigrationRule, ["[[migration.rules]]"]),
    (schema.MigrationCandidate, ["[[migration.rules.candidates]]"]),
]


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines written above each field of ``cls``, joined."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"^\s{4}(\w+):", line)
        if match:
            comments[match[1]] = " ".join(pending)
        pending = []
    return comments


def _bounds(info: Any) -> list[str]:
    marks = []
    for attribute, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        value = getattr(info, attribute, None)
        if value is not None:
            marks.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
    if getattr(info, "min_length", None) is not None:
        marks.append(f"length ≥ {info.min_length}")
    if getattr(info, "max_length", None) is not None:
        marks.append(f"length ≤ {info.max_length}")
    if getattr(info, "pattern", None):
        marks.append(f"matches `{info.pattern}`")
    return marks


def type_name(info: Any) -> str:
    """A reader's name for a msgspec type: ``integer ≥ 1``, ``"a" | "b"``, ``list of string``."""
    if isinstance(info, mi.UnionType):
        kinds = [type_name(kind) for kind in info.types if not isinstance(kind, mi.NoneType)]
        return " or ".join(kinds) + " (optional)"
    if isinstance(info, mi.LiteralType):
        return " | ".join(f'`"{value}"`' for value in info.values)
    if isinstance(info, mi.ListType):
        return f"list of {type_name(info.item_type)}"
    if isinstance(info, mi.DictType):
        return f"table: {type_name(info.key_type)} → {type_name(info.value_type)}"
    if isinstance(info, mi.StructType):
        return f"[{info.cls.__name__}](#{info.cls.__name__.lower()})"
    names = {
        mi.IntType: "integer",
        mi.FloatType: "number",
        mi.StrType: "string",
        mi.BoolType: "boolean",
        mi.DecimalType: 'decimal (`"2.50"`, exact)',
    }
    name = names.get(type(info), type(info).__name__)
    marks = _bounds(info)
    return f"{name} {', '.join(marks)}" if marks else name


def _struct_summary(info: Any) -> str:
    """The first sentence of the docstring of the struct ``info`` is (or holds), if any."""
    for attribute in ("item_type", "value_type"):
        info = getattr(info, attribute, info)
    if not isinstance(info, mi.StructType):
        return ""
    doc = " ".join((inspect.getdoc(info.cls) or "").split("\n\n")[0].split())
    return doc.split(". ")[0].rstrip(".") + "."


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, int | float):
        return f"{value:,}" if isinstance(value, int) and value >= 10_000 else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, msgspec.Struct):
        changed = {
            name: getattr(value, name)
            for name in value.__struct_fields__
            if getattr(value, name) != getattr(type(value)(), name)
        }
        return _toml(changed) if changed else ""
    return repr(value)


def default_of(field: mi.Field) -> str:
    if field.required:
        return "**required**"
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if value is None:
        return "unset"
    if value in ([], {}):
        return "empty"
    shown = _toml(value)
    return f"`{shown}`" if shown else "its own defaults"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Every setting of the configuration file, generated from its schema",
        "(`tenantware/config.py`). The [configuration guide](../configuration.md) shows how the",
        "pieces fit; a file is checked whole when it is loaded, and an unknown field is an",
        'error. *optional* fields may be left out; money is a decimal string (`"2.50"`) and',
        "never a float.",
        "",
    ]
    for cls, places in SECTIONS:
        out += [f"## {cls.__name__}", ""]
        out += [f"In the file as: {', '.join(f'`{place}`' for place in places)}.", ""]
        doc = inspect.getdoc(cls) or ""
        out += [" ".join(doc.split("\n\n")[0].split()), ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        comments = field_comments(cls)
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        for field in info.fields:
            meaning = comments.get(field.name) or _struct_summary(field.type)
            out.append(
                f"| `{field.name}` | {_cell(type_name(field.type))} | "
                f"{_cell(default_of(field))} | {_cell(meaning)} |"
            )
        out.append("")
    out += _built_in_tiers() + _catalogue() + _failure_policies()
    return "\n".join(out).rstrip() + "\n"


def _built_in_tiers() -> list[str]:
    rows = [
        "## Built-in tiers",
        "",
        "A tenant's `tier` defaults to `free`; `[tiers.NAME]` replaces a built-in tier or adds",
        "one, and a tenant's own `weight`, `max_priority` and `[tenants.limits]` override its",
        "tier's, field by field. Every other limit is unset (not limited).",
        "",
        "| tier | weight | max priority | requests / minute | tokens / minute | burst "
        "| queue wait |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tier in schema.DEFAULT_TIERS.items():
        limits = tier.limits
        rows.append(
            f"| `{name}` | {tier.weight:g} | {tier.max_priority} | "
            f"{limits.requests_per_minute:,} | {limits.tokens_per_minute:,} | "
            f"{limits.burst_multiplier:g}x | {tier.max_queue_wait_s:g} s |"
        )
    return [*rows, ""]


def _catalogue() -> list[str]:
    rows = [
        "## Built-in model catalogue",
        "",
        'USD per million tokens; `[models."NAME"]` replaces an entry or adds one,',
        "`include_default_models = false` starts from an empty catalogue.",
        "",
        "| model | input | output | cached input | cache write |",
        "|---|---|---|---|---|",
    ]
    for name, spec in schema.DEFAULT_MODELS.items():
        cache_write = spec.cache_write_per_mtok or spec.input_per_mtok
        rows.append(
            f"| `{name}` | {spec.input_per_mtok} | {spec.output_per_mtok} | "
            f"{spec.cached_input_per_mtok} | {cache_write} |"
        )
    return [*rows, ""]


def _failure_policies() -> list[str]:
    rows = [
        "## Store failure policies",
        "",
        "What each kind of limit does while Redis is unreachable, unless",
        "`[quota.on_store_failure]` or `gateway.on_store_failure` says otherwise",
        "([quotas](../quotas.md#failure-policies)).",
        "",
        "| kind | default |",
        "|---|---|",
    ]
    for kind, policy in schema.DEFAULT_FAILURE_POLICIES.items():
        rows.append(f"| `{kind}` | `{policy}` |")
    return [*rows, ""]


if __name__ == "__main__":
    sys.stdout.write(render())
