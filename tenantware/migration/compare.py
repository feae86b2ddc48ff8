"""How two answers to the same request compare: exact text, a cheap similarity, same tools.

Answers are read in the client's format (chat completions, the Responses API or Anthropic
Messages; JSON or SSE), since both the primary's and the shadow's have been brought to it.
The similarity is the Jaccard index of the two texts' word sets: cheap, order-blind, 1.0 for
equal texts and for two empty ones.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Answer", "agreement", "answer_of"]

_decode = msgspec.json.Decoder().decode


class Answer(msgspec.Struct, frozen=True):
    """The text of an answer and the names of the tools it called, in order."""

    text: str = ""
    tools: tuple[str, ...] = ()


def _json(data: bytes) -> Any:
    try:
        return _decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _whole(body: dict[str, Any], text: list[str], tools: list[str]) -> None:
    """A whole answer: a chat completion, a Response object or an Anthropic message."""
    message = _first_choice(body).get("message")
    if isinstance(message, dict):
        if isinstance(message.get("content"), str):
            text.append(message["content"])
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                tools.append(str(call["function"].get("name")))
    for item in body.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            tools.append(str(item.get("name")))
        for part in item.get("content") or ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text.append(part["text"])
    if body.get("type") == "message":
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif block.get("type") == "tool_use":
                tools.append(str(block.get("name")))


def _event(data: dict[str, Any], text: list[str], tools: list[str]) -> None:
    """One streamed event of any of the three formats."""
    delta = _first_choice(data).get("delta")
    if isinstance(delta, dict):
        if isinstance(delta.get("content"), str):
            text.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and function.get("name"):
                tools.append(str(function["name"]))
    kind = data.get("type")
    if kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
        text.append(data["delta"])
    elif kind == "response.output_item.added":
        item = data.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            tools.append(str(item.get("name")))
    elif kind == "content_block_delta":
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):
            text.append(delta["text"])
    elif kind == "content_block_start":
        block = data.get("content_block")
        if isinstance(block, dict) and block.get("type") == "tool_use":
            tools.append(str(block.get("name")))


def answer_of(body: bytes, *, stream: bool) -> Answer:
    """The text and tool calls of an answer as the client got it (``stream``: SSE)."""
    text: list[str] = []
    tools: list[str] = []
    if not stream:
        data = _json(body)
        if isinstance(data, dict):
            _whole(data, text, tools)
        return Answer("".join(text), tuple(tools))
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = _json(line[5:].strip())
        if isinstance(data, dict):
            _event(data, text, tools)
    return Answer("".join(text), tuple(tools))


def agreement(primary: Answer, shadow: Answer) -> tuple[bool, float, bool]:
    """(exact text match, Jaccard similarity of the word sets, same tools called)."""
    exact = primary.text == shadow.text
    if exact:
        similarity = 1.0
    else:
        words, other = set(primary.text.split()), set(shadow.text.split())
        union = words | other
        similarity = len(words & other) / len(union) if union else 1.0
    return exact, similarity, primary.tools == shadow.tools
