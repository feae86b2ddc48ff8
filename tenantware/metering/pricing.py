"""Exact money arithmetic: prices and costs as integer nano-dollars (1e-9 USD).

Every layer that charges (quota reservations, settlement, the ledger) calls ``cost_nanousd``,
so what is reserved, settled and billed can agree to the last unit. Nano-dollars keep prices
with three decimals per million tokens exact per token and stay exact inside Redis Lua
(doubles hold integers exactly up to 2**53 nano-dollars, about 9 million USD).
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from tenantware.config import ModelSpec

__all__ = ["NANO_PER_USD", "Price", "cost_nanousd", "nanousd_to_usd", "price_of", "usd_to_nanousd"]

NANO_PER_USD = 1_000_000_000
_NANO_PER_TOKEN_PER_USD_PER_MTOK = Decimal(NANO_PER_USD) / Decimal(1_000_000)


class Price(msgspec.Struct, frozen=True):
    """A model's price in nano-dollars per token (and per request)."""

    input: int
    output: int
    cached_input: int
    per_request: int = 0
    #: Per prompt token written to the cache (Anthropic's cache creation).
    cache_write: int = 0


def usd_to_nanousd(amount: Decimal) -> int:
    """Whole nano-dollars in ``amount`` USD; a budget is never rounded up."""
    return int(amount * NANO_PER_USD)


def nanousd_to_usd(amount: int) -> Decimal:
    """Exact USD value of an amount of nano-dollars."""
    return Decimal(amount) / NANO_PER_USD


def _per_token(usd_per_mtok: Decimal, model: str, what: str) -> int:
    value = usd_per_mtok * _NANO_PER_TOKEN_PER_USD_PER_MTOK
    if value != value.to_integral_value():
        raise ValueError(
            f"{model}: {what} price {usd_per_mtok} USD/Mtok has more than 3 decimals; "
            "tenantware bills in whole nano-dollars per token"
        )
    return int(value)


def price_of(model: str, spec: ModelSpec) -> Price:
    """Convert a catalogue entry (USD per million tokens) to nano-dollars per token."""
    cached = spec.cached_input_per_mtok
    write = spec.cache_write_per_mtok
    return Price(
        input=_per_token(spec.input_per_mtok, model, "input"),
        output=_per_token(spec.output_per_mtok, model, "output"),
        cached_input=_per_token(
            cached if cached is not None else spec.input_per_mtok, model, "cached input"
        ),
        per_request=usd_to_nanousd(spec.fee_per_request),
        cache_write=_per_token(
            write if write is not None else spec.input_per_mtok, model, "cache write"
        ),
    )


def cost_nanousd(
    price: Price,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> int:
    """Cost of one request; ``cached_tokens`` are the part of ``input_tokens`` read from cache,
    ``cache_write_tokens`` the part written to it."""
    cached = min(cached_tokens, input_tokens)
    written = min(cache_write_tokens, input_tokens - cached)
    return (
        (input_tokens - cached - written) * price.input
        + cached * price.cached_input
        + written * price.cache_write
        + output_tokens * price.output
        + price.per_request
    )
