"""The error-flow rule (``tenantware.context``): who answers what, and nothing unshaped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import httpx
import pytest
import structlog.testing

from tenantware import Gateway
from tenantware.breaker.board import CircuitOpen, circuit_open
from tenantware.context import Outcome, OutcomeName
from tenantware.errors import GatewayError, circuit_open_error
from tenantware.proxy.upstream import UpstreamResponse
from tenantware.types import Receive, Scope, Send
from tests.support import CHAT, KEYS, make_config

pytestmark = pytest.mark.anyio


def _client(app: Any, key: str = KEYS["acme"]) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://gateway.test",
        headers={"authorization": f"Bearer {key}"},
    )


def _assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert response.headers["x-request-id"]
    return dict(error)


def test_outcome_constants_are_exactly_the_outcome_names() -> None:
    constants = {value for name, value in vars(Outcome).items() if name.isupper()}
    assert constants == set(get_args(OutcomeName))


def test_an_open_circuit_is_a_decision_that_maps_to_a_503() -> None:
    decision = circuit_open("gpt-4.1", float("inf"))
    assert decision == CircuitOpen("gpt-4.1", 1.0)
    assert circuit_open("gpt-4.1", 0.0).wait_s > 0
    error = circuit_open_error(*circuit_open("gpt-4.1", 2.2))
    assert (error.status, error.code, error.outcome) == (503, "circuit_open", Outcome.BREAKER_OPEN)
    assert error.retry_after == 2.2
    assert "Retry in 3 s" in error.message


async def test_a_stray_exception_of_an_app_is_an_openai_shaped_500_and_still_raised() -> None:
    gateway = Gateway(make_config())
    raised: list[BaseException] = []

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom with a detail the client must not see")

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await gateway.wrap(broken)(scope, receive, send)
        except RuntimeError as exc:
            raised.append(exc)
            raise

    async with _client(recording) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    error = _assert_openai_error(response, 500, "internal_error")
    assert "boom" not in response.text
    assert error["type"] == "server_error"
    assert len(raised) == 1  # the server still sees (and logs) it


@pytest.mark.parametrize("breaker", [True, False])
async def test_an_apps_gateway_error_is_answered_inside_the_quota_layer(breaker: bool) -> None:
    """With or without the breaker layer, the app's own refusal carries the quota headers."""
    gateway = Gateway(make_config(breaker={"enabled": breaker}))

    async def picky(scope: Scope, receive: Receive, send: Send) -> None:
        raise GatewayError(422, "This app wants a system message.", param="messages")

    async with gateway.running(), _client(gateway.wrap(picky)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        await gateway.writer.flush()  # type: ignore[union-attr]
    error = _assert_openai_error(response, 422, None)  # type: ignore[arg-type]
    assert error["param"] == "messages"
    assert response.headers["x-ratelimit-limit-requests"]
    (record,) = gateway.ledger.records.values()  # type: ignore[union-attr]
    assert (record.status, record.outcome) == (422, Outcome.REJECTED_REQUEST)


class _BuggyClient:
    """An upstream client with a bug: not an upstream failure, a stray exception."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> UpstreamResponse:
        raise KeyError("a bug")

    async def aclose(self) -> None:
        return None


async def test_a_stray_exception_in_the_proxy_is_logged_and_answered_500() -> None:
    gateway = Gateway(make_config(), upstream_client=_BuggyClient())
    with structlog.testing.capture_logs() as logs:
        async with gateway.running(), _client(gateway.asgi_app()) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
            await gateway.writer.flush()  # type: ignore[union-attr]
    _assert_openai_error(response, 500, "internal_error")
    assert any(entry["event"] == "proxy failed" for entry in logs), logs
    (record,) = gateway.ledger.records.values()  # type: ignore[union-attr]
    assert (record.status, record.outcome) == (500, Outcome.ERROR)
