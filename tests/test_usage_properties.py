"""Properties of the SSE usage tap and the JSON usage parser (hypothesis, bounded examples):
however a valid stream is cut into reads, the tap relays the same bytes and taps the same
usage as from one read; whatever an upstream puts in its usage fields (or its body), parsing
never raises and the usage always lands inside the request's bounds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantware.context import Usage
from tenantware.metering.usage import (
    MAX_USAGE_TOKENS,
    StreamTap,
    UsageBounds,
    bound_usage,
    checked_usage,
    parse_json_usage,
)

#: Bounded and deterministic enough for CI on a loaded host: no deadline, no example database.
BOUNDED = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KINDS = {"negative", "too_large", "malformed", "inconsistent"}

counts = st.integers(min_value=0, max_value=10_000)
hostile_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
hostile_usage = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": st.one_of(hostile_numbers, json_values),
            "completion_tokens": st.one_of(hostile_numbers, json_values),
            "prompt_tokens_details": st.one_of(
                json_values, st.fixed_dictionaries({"cached_tokens": hostile_numbers})
            ),
            "completion_tokens_details": st.one_of(
                json_values, st.fixed_dictionaries({"reasoning_tokens": hostile_numbers})
            ),
        },
    ),
)
bounds = st.builds(
    UsageBounds,
    max_input=st.integers(min_value=0, max_value=MAX_USAGE_TOKENS),
    max_output=st.integers(min_value=0, max_value=MAX_USAGE_TOKENS),
    prompt_estimate=st.integers(min_value=0, max_value=10**12),
)


def _inside(usage: Usage, limits: UsageBounds) -> None:
    assert 0 <= usage.input_tokens <= limits.max_input
    assert 0 <= usage.output_tokens <= limits.max_output
    assert 0 <= usage.cached_tokens <= usage.input_tokens
    assert 0 <= usage.reasoning_tokens <= usage.output_tokens
    assert set(usage.anomalies) <= KINDS


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bytes, dict[str, int] | None]:
    """A chat completion stream as OpenAI sends it, with or without its usage chunk."""
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    texts = draw(st.lists(st.text(max_size=20), max_size=12))
    events = [_event({**head, "choices": [{"index": 0, "delta": {"content": t}}]}) for t in texts]
    usage = None
    if draw(st.booleans()):
        usage = {"prompt_tokens": draw(counts), "completion_tokens": draw(counts)}
        events.append(_event({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    stream = b"".join(events)
    if draw(st.booleans()):
        stream = stream.replace(b"\n", b"\r\n")
    return stream, usage


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _relay(chunks: list[bytes], hide_usage: bool) -> tuple[bytes, StreamTap]:
    tap = StreamTap(hide_usage=hide_usage)
    out = b"".join(tap.feed(chunk) for chunk in chunks) + tap.flush()
    return out, tap


@BOUNDED
@given(valid_streams(), st.lists(st.integers(min_value=0), max_size=40), st.booleans())
def test_any_chunking_of_a_valid_stream_taps_what_one_read_does(
    drawn: tuple[bytes, dict[str, int] | None], cuts: list[int], hide_usage: bool
) -> None:
    stream, usage = drawn
    whole_out, whole = _relay([stream], hide_usage)
    cut_out, cut = _relay(_cut(stream, cuts), hide_usage)
    assert cut_out == whole_out
    assert (cut.usage, cut.content_chars, cut.model, cut.events) == (
        whole.usage,
        whole.content_chars,
        whole.model,
        whole.events,
    )
    if usage is None:
        assert whole.usage is None
    else:
        assert whole.usage is not None
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert not whole.usage.anomalies


@BOUNDED
@given(hostile_usage, bounds, st.integers(min_value=-5, max_value=10**12))
def test_hostile_usage_never_raises_and_always_lands_inside_the_bounds(
    raw: Any, limits: UsageBounds, relayed: int
) -> None:
    usage = checked_usage(raw, limits, lambda: relayed)
    _inside(usage, limits)
    assert bound_usage(usage, limits) is usage
    without_estimates = checked_usage(raw, UsageBounds(limits.max_input, limits.max_output))
    _inside(without_estimates, limits)
    assert not without_estimates.estimated


@BOUNDED
@given(hostile_usage, bounds)
def test_hostile_usage_in_a_json_answer_or_a_stream_lands_inside_the_bounds(
    raw: Any, limits: UsageBounds
) -> None:
    answer = {"model": "m", "choices": [], "usage": raw}
    body = json.dumps(answer).encode()  # NaN and Infinity as Python writes them: not JSON
    usage, model = parse_json_usage(body, limits)
    try:
        json.dumps(answer, allow_nan=False)
        strict = True
    except ValueError:
        strict = False
    assert model == ("m" if strict else None)
    if raw is not None and strict:
        assert usage is not None
        _inside(usage, limits)
    tap = StreamTap(bounds=limits, hide_usage=True)
    assert tap.feed(b"data: " + body + b"\n\n") in (b"", b"data: " + body + b"\n\n")
    if tap.usage is not None:
        _inside(tap.usage, limits)


@BOUNDED
@given(st.binary(max_size=300), st.lists(st.binary(max_size=60), max_size=8), bounds)
def test_arbitrary_bytes_never_raise(body: bytes, chunks: list[bytes], limits: UsageBounds) -> None:
    usage, _model = parse_json_usage(body, limits)
    if usage is not None:
        _inside(usage, limits)
    tap = StreamTap(bounds=limits)
    for chunk in chunks:
        tap.feed(b"data: " + chunk + b"\n\n")
        tap.feed(chunk)
    tap.flush()
    if tap.usage is not None:
        _inside(tap.usage, limits)


@BOUNDED
@given(
    st.builds(
        Usage,
        input_tokens=hostile_numbers.filter(lambda v: type(v) is int),
        output_tokens=st.integers(min_value=-(10**20), max_value=10**20),
        cached_tokens=st.integers(min_value=-(10**20), max_value=10**20),
        reasoning_tokens=st.integers(min_value=-(10**20), max_value=10**20),
    ),
    bounds,
)
def test_usage_set_by_an_app_is_bounded_once_and_stays_put(
    usage: Usage, limits: UsageBounds
) -> None:
    bounded = bound_usage(usage, limits)
    _inside(bounded, limits)
    assert bound_usage(bounded, limits) is bounded
