"""Conversation messages and tool data, apart from any chat format.

Messages are ``{"role", "content"}`` dicts with roles ``system`` (first only), ``user``, ``assistant``, and for tool
use ``function_call`` (a reply whose content is the JSON of one call ``{"name", "arguments"}`` or a list of them)
and ``observation`` (a tool result, answered by the next reply). Tools are a list of JSON schemas, passed apart.
This module reads tool schemas and tool calls (as LLaMA-Factory data writes them) and converts messages to the
OpenAI shape that ``apply_chat_template`` and OpenAI-compatible servers take. launcher/templates.py renders them.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

Messages = Sequence[dict[str, str]]


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as a list of OpenAI-style ``{"type": "function", "function": schema}`` dicts.

    Accepts the JSON string LLaMA-Factory data keeps in its ``tools`` column, a list, or bare function schemas
    (wrapped, as LLaMA-Factory does). Raises ValueError with the reason when the value is not a list of objects.
    """
    if isinstance(tools, str):
        if not tools.strip():
            return []
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg})") from None
    if tools is None:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("must be a list of JSON objects (function schemas)")
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]


def parse_tool_calls(content: str) -> list[tuple[str, Any]]:
    """(name, arguments) of the calls in a function_call message: ``{"name", "arguments"}`` or a list of them."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as err:
        raise ValueError(f"a function_call must be JSON {{\"name\": ..., \"arguments\": {{...}}}} "
                         f"({err.msg})") from None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ValueError("a function_call must be a JSON object {\"name\": ..., \"arguments\": {...}} or a list "
                         "of them")
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise ValueError("each function call needs a string \"name\" and \"arguments\"")
        out.append((call["name"], call["arguments"]))
    return out


def arguments_text(arguments: Any) -> str:
    # As the Jinja side prints them: a string as is, anything else as JSON (transformers' tojson).
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def to_openai_messages(messages: Messages) -> list[dict[str, Any]]:
    """Our messages in the shape ``apply_chat_template`` and OpenAI-compatible servers take: function_call ->
    assistant with ``tool_calls``, observation -> ``tool``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "function_call":
            calls = [{"type": "function", "function": {"name": n, "arguments": a}}
                     for n, a in parse_tool_calls(m["content"])]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif m["role"] == "observation":
            out.append({"role": "tool", "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
