"""The proxy's served OpenAPI document (issue 21): valid, public, and true. Schemathesis
generates requests from it (bounded examples per operation), sends them to the in-process
gateway in front of the fake upstream, and checks every answer: no 5xx from the gateway, and
status, content type and body as documented (OpenAI's error shape; Anthropic's on
``/v1/messages``)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.generation import GenerationMode

from tenantware.proxy.openapi import OPENAPI_PATH
from tests.support import KEYS, client_for, in_process_gateway, make_config

EXAMPLES_PER_OPERATION = 8
#: A model of the configuration: most generated bodies then reach the fake upstream.
MODEL = "gpt-4.1"


@pytest.mark.anyio
async def test_the_document_is_valid_and_served_without_a_key() -> None:
    from openapi_spec_validator import validate

    gateway, _ = in_process_gateway()
    async with client_for(gateway.asgi_app()) as anyone:
        response = await anyone.get(OPENAPI_PATH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        document = response.json()
        # The document lists routes, never state: the models themselves still need a key.
        assert (await anyone.get("/v1/models")).status_code == 401
    assert document["openapi"] == "3.1.0"
    validate(document)
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/responses/{response_id}/input_items",
    }
    schemas = document["components"]["schemas"]
    assert "OpenAIError" in schemas
    assert "AnthropicError" in schemas
    # The proxy app answers it too when mounted on its own.
    async with client_for(gateway.proxy) as anyone:
        assert (await anyone.get(OPENAPI_PATH)).json() == document


def test_the_proxy_answers_as_its_document_says() -> None:
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    paths = [result.ok().path for result in proxy_schema().get_all_operations()]
    assert len(paths) == 10
    for index in range(len(paths)):
        for mode in GenerationMode:
            # A gateway per run: the tenant's circuit, paused by a run of invalid requests,
            # would otherwise answer every later operation with a 429.
            operation = list(proxy_schema().get_all_operations())[index].ok()
            check(operation, mode, headers)


def proxy_schema() -> Any:
    """The served document, loaded from a new in-process gateway and its fake upstream."""
    gateway, _ = in_process_gateway(config=make_config(metering={"enabled": False}))
    return schemathesis.openapi.from_asgi(OPENAPI_PATH, gateway.asgi_app())


def check(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    """``EXAMPLES_PER_OPERATION`` generated requests of one operation, each validated."""

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case: Any) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body["model"] = MODEL
        # A body the schema allows may still be refused (an unknown model, a quota), and the
        # gateway forwards fields it does not read, so a body the schema forbids may be
        # answered by the upstream: acceptance and rejection are not checked. Every other
        # check runs: no 5xx, status codes, content types and bodies as documented.
        case.call_and_validate(
            headers=headers,
            excluded_checks=[positive_data_acceptance, negative_data_rejection],
        )

    conforms()
