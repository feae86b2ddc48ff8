"""The model catalogue: alias resolution and per-model prices, computed once per config."""

from __future__ import annotations

from tenantware.config import GatewayConfig, ModelSpec
from tenantware.metering.pricing import Price, price_of

__all__ = ["Catalogue"]


class Catalogue:
    """Canonical model names, their aliases and prices."""

    __slots__ = ("_names", "models", "prices")

    def __init__(self, config: GatewayConfig) -> None:
        self.models: dict[str, ModelSpec] = config.catalogue()
        self.prices: dict[str, Price] = {
            name: price_of(name, spec) for name, spec in self.models.items()
        }
        self._names: dict[str, str] = {name: name for name in self.models}
        self._names.update(config.aliases)

    def resolve(self, name: str) -> str | None:
        """The canonical name for a model name or alias, or ``None`` if unknown."""
        return self._names.get(name)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model)
