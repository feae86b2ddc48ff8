"""The billing rules: which usage of a finished request is charged, and at what cost.

One function decides for every layer (quota settlement, the ledger), so what is settled and
what is billed agree:

- rejected by the gateway (auth, request, quota, budget, queue, breaker): not billed;
- the upstream failed before producing any output token: not billed;
- the upstream failed mid-stream: billed for what was relayed (the proxy counts it);
- the client disconnected mid-stream: billed for what the upstream produced (its usage chunk
  when it came, else the relayed text counted with the quota layer's estimator);
- served from the tenant's response cache (``cached``): not billed. No upstream call was made
  and the tokens of the answer were billed when it was first produced; the record counts the
  request (outcome ``cached``) with zero tokens and zero cost;
- otherwise: the upstream's usage.

Cost is ``cost_nanousd`` with the price of the model that actually answered (a fallback may
serve another model than the one requested). What the tenant is charged (``charge``) is that
cost with its markup, except for a call made with the tenant's own upstream key: metered
(tokens and list cost recorded) but charged nothing, against no budget or balance.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Final

from tenantware.catalogue import Catalogue
from tenantware.context import Outcome, OutcomeName, RequestContext, Usage, default_outcome
from tenantware.metering.pricing import cost_nanousd

__all__ = [
    "FREE",
    "NOT_BILLED",
    "SHADOW",
    "apply_markup",
    "billable_usage",
    "charge",
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
#: Outcomes of requests answered without an upstream call, by the gateway itself: not billed
#: either, but not refusals (metrics count them as answered).
FREE: Final = frozenset({Outcome.CACHED})
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
    if usage is None or outcome in NOT_BILLED or outcome in FREE:
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


def charge(cost: int, percent: Decimal | None, *, own_key: bool) -> int:
    """What the tenant pays for a request of list ``cost``: with its markup, or nothing when
    the call used its own upstream key."""
    return 0 if own_key else apply_markup(cost, percent)
