"""A long stream is charged to its tenant's fair-share counter as it goes, not only at its end."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tenantware import Gateway, get_context
from tenantware.context import Usage
from tenantware.types import Receive, Scope, Send
from tests.support import CHAT, KEYS, client_for, make_config

pytestmark = pytest.mark.anyio

EVENT = b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'


async def test_a_long_stream_is_charged_while_it_streams() -> None:
    gateway = Gateway(make_config(admission={"seats": 2}))
    seen: dict[str, Any] = {}

    async def counter() -> float:
        return float((await gateway.admission.state())["*"]["tenants"]["acme"]["counter"])

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        seen["start"] = await counter()
        # Past the charging period, 50 more tokens: the counter follows before the end.
        await anyio.sleep(0.6)
        await send({"type": "http.response.body", "body": EVENT * 50, "more_body": True})
        seen["during"] = await counter()
        assert ctx.tenant is not None
        seen["weight"] = ctx.tenant.weight
        seen["prompt"] = ctx.estimated_prompt_tokens
        ctx.usage = Usage(input_tokens=30, output_tokens=51)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    app = gateway.wrap(streaming)
    body = {**CHAT, "stream": True, "max_tokens": 8}
    async with client_for(app, KEYS["acme"]) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    weight, prompt = seen["weight"], seen["prompt"]
    # Charged at dispatch: prompt + 2 x 8 (max_tokens); streamed: 51 output tokens.
    assert seen["during"] - seen["start"] == pytest.approx(2 * (51 - 8) / weight)
    # The completion corrects from what was charged so far: no token is counted twice.
    actual = 30 + 2 * 51
    assert await counter() - seen["start"] == pytest.approx((actual - (prompt + 2 * 8)) / weight)
