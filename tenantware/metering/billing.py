"""The billing rules: which usage of a finished request is charged, and at what cost.

One function decides for every layer (quota settlement, the ledger), so what is settled and
what is billed agree:

- rejected by the gateway (auth, request, quota, budget, queue, breaker): not billed;
- the upstream failed before producing any output token: not billed;
- the upstream failed mid-stream: billed for what was relayed (the proxy counts it);
- the client disconnected mid-stream: billed for what the upstream produced (its usage chunk
  when it came, else the relayed text counted with the quota layer's estimator);
- otherwise: the upstream's usage.

Cost is ``cost_nanousd`` with the price of the model that actually answered (a fallback may
serve another model than the one requested).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Final

from tenantware.catalogue import Catalogue
from tenantware.context import Outcome, OutcomeName, RequestContext, Usage, default_outcome
from tenantware.metering.pricing import cost_nanousd

__all__ = [
    "NOT_BILLED",
    "SHADOW",
    "apply_markup",
    "billable_usage",
    "final_outcome",
    "request_cost",
]

#: Outcomes of requests the gateway refused: recorded, never billed.
NOT_BILLED: Final = frozenset(
    {
        Outcome.REJECTED_AUTH,
        Outcome.REJECTED_REQUEST,
        Outcome.REJECTED_QUOTA,
        Outcome.REJECTED_BUDGET,
        Outcome.REJECTED_QUEUE,
        Outcome.BREAKER_OPEN,
    }
)
#: Ledger outcome of a migration trial's shadow copy of a request: its cost is the operator's,
#: recorded (``cost_nanousd``) and never charged to the tenant (``charged_nanousd`` 0), and
#: tenant reports leave it out.
SHADOW: Final = "shadow"
_FAILED: Final = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT, Outcome.ERROR})
_HUNDRED: Final = Decimal(100)


def final_outcome(ctx: RequestContext) -> OutcomeName:
    """The outcome a finished request is recorded and billed under: the one a layer set,
    else what its status says (an app that is not the proxy sets none)."""
    if ctx.outcome is not None:
        return ctx.outcome
    status = ctx.status
    if 0 < status < 400:
        return Outcome.OK
    return default_outcome(status) if status else Outcome.ERROR


def billable_usage(outcome: str | None, usage: Usage | None) -> Usage | None:
    """The usage to bill for a request that ended with ``outcome``; ``None``: not billed."""
    if usage is None or outcome in NOT_BILLED:
        return None
    if outcome in _FAILED and usage.output_tokens == 0:
        return None
    return usage


def request_cost(ctx: RequestContext, catalogue: Catalogue) -> int:
    """Nano-dollars at list price: the quota layer's settled cost when it set one."""
    if ctx.cost_nanousd is not None:
        return ctx.cost_nanousd
    usage = billable_usage(ctx.outcome, ctx.usage)
    model = ctx.model_served or ctx.model
    if usage is None or model is None:
        return 0
    price = catalogue.price(model)
    if price is None:
        return 0
    return cost_nanousd(
        price,
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.cache_write_tokens,
    )


def apply_markup(cost: int, percent: Decimal | None) -> int:
    """``cost`` with a markup (positive) or discount (negative) percentage, in whole
    nano-dollars rounded half to even."""
    if not percent or not cost:
        return cost
    charged = Decimal(cost) * (_HUNDRED + percent) / _HUNDRED
    return int(charged.to_integral_value(rounding=ROUND_HALF_EVEN))
