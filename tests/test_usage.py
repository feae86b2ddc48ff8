"""StreamTap: SSE split into events however the bytes arrive, usage tapped, usage chunk hidden."""

from __future__ import annotations

import random

import pytest

from tenantware.context import Usage
from tenantware.metering.usage import StreamTap

HEAD = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":['
)
OPENING = HEAD + b'{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n'
TOKEN = HEAD + b'{"index":0,"delta":{"content":"tok "},"finish_reason":null}],"usage":null}\n\n'
FINISH = HEAD + b'{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
USAGE = (
    HEAD + b'],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,'
    b'"prompt_tokens_details":{"cached_tokens":2}}}\n\n'
)
DONE = b"data: [DONE]\n\n"
STREAM = OPENING + TOKEN * 3 + FINISH + USAGE + DONE
EXPECTED_USAGE = Usage(input_tokens=7, output_tokens=3, cached_tokens=2)


def _relay(chunks: list[bytes], *, hide_usage: bool) -> tuple[bytes, StreamTap]:
    tap = StreamTap(hide_usage=hide_usage)
    out = b"".join(tap.feed(chunk) for chunk in chunks) + tap.flush()
    return out, tap


def _events() -> list[bytes]:
    return [OPENING, TOKEN, TOKEN, TOKEN, FINISH, USAGE, DONE]


@pytest.mark.parametrize("hide_usage", [False, True])
def test_one_event_per_read(hide_usage: bool) -> None:
    out, tap = _relay(_events(), hide_usage=hide_usage)
    assert out == (STREAM.replace(USAGE, b"") if hide_usage else STREAM)
    assert tap.usage == EXPECTED_USAGE
    assert tap.model == "gpt-4.1"
    assert tap.content_chars == 12
    assert tap.events == 6


@pytest.mark.parametrize("split", range(1, len(USAGE)))
def test_usage_chunk_split_across_two_reads_is_tapped_and_hidden(split: int) -> None:
    """Wherever the TCP reads cut the usage chunk (even inside its ``\\n\\n``)."""
    before = OPENING + TOKEN * 3 + FINISH
    chunks = [before, USAGE[:split], USAGE[split:], DONE]
    out, tap = _relay(chunks, hide_usage=True)
    assert out == before + DONE
    assert tap.usage == EXPECTED_USAGE
    assert tap.content_chars == 12


@pytest.mark.parametrize("seed", range(20))
def test_any_cut_of_the_stream_relays_the_same_bytes(seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
    chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
    for hide_usage in (False, True):
        out, tap = _relay(chunks, hide_usage=hide_usage)
        whole, whole_tap = _relay(_events(), hide_usage=hide_usage)
        assert out == whole
        assert (tap.usage, tap.content_chars, tap.model) == (
            whole_tap.usage,
            whole_tap.content_chars,
            whole_tap.model,
        )


def test_several_events_in_one_read_and_crlf_line_ends() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    out, tap = _relay([crlf[:300], crlf[300:]], hide_usage=True)
    assert out == STREAM.replace(USAGE, b"")
    assert tap.usage == EXPECTED_USAGE


def test_data_field_without_space_comments_and_non_json_events_pass_through() -> None:
    no_space = USAGE.replace(b"data: ", b"data:", 1)
    events = [b": keep-alive\n\n", b"event: ping\ndata: {}\n\n", b"data: not json\n\n"]
    out, tap = _relay([*events, TOKEN, no_space, DONE], hide_usage=True)
    assert out == b"".join(events) + TOKEN + DONE
    assert tap.usage == EXPECTED_USAGE
    assert tap.content_chars == 4


def test_usage_chunk_with_choices_is_not_hidden_and_reasoning_counts() -> None:
    both = HEAD + (
        b'{"index":0,"delta":{"content":"ab","reasoning_content":"xyz"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    )
    out, tap = _relay([both], hide_usage=True)
    assert out == both
    assert tap.usage == Usage(input_tokens=1, output_tokens=2)
    assert tap.content_chars == 5


def test_an_incomplete_last_event_is_flushed_not_inspected() -> None:
    tap = StreamTap(hide_usage=True)
    assert tap.feed(TOKEN + USAGE[:-2]) == TOKEN
    assert tap.flush() == USAGE[:-2]
    assert tap.usage is None
    assert tap.estimated_output_tokens() > 0


def test_the_gateways_own_estimate_is_clamped_but_not_an_anomaly() -> None:
    from tenantware.metering.usage import UsageBounds, bound_usage

    bounds = UsageBounds(max_input=100, max_output=5)
    estimate = Usage(input_tokens=10, output_tokens=25, estimated=True)
    clamped = bound_usage(estimate, bounds)
    assert (clamped.output_tokens, clamped.estimated, clamped.anomalies) == (5, True, ())
    reported = bound_usage(Usage(input_tokens=-1, output_tokens=25), bounds)
    assert (reported.input_tokens, reported.output_tokens) == (0, 5)
    assert reported.anomalies == ("negative", "too_large")
