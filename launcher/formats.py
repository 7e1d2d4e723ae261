"""Record -> messages: LLaMA-Factory's ``alpaca`` and ``sharegpt`` formats (OpenAI-style tool calls included).

:func:`to_messages` turns one record of a registered dataset into the ``{"role", "content"}`` messages and the
tool schemas that launcher/templates.py encodes; a missing field, a wrong type or a turn out of order is a
:class:`~launcher.registry.DataError` naming the record and the field.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from launcher.messages import normalize_tools, parse_tool_calls
from launcher.registry import DataError, DatasetEntry


Messages = list[dict[str, str]]


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    """A string field: missing/None and non-strings are errors (when required), named with the field."""
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{where}: field {key!r} is missing.", "missing field")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}.", "not a string")
    return value


def _tools(record: dict, key: str, where: str) -> list[dict[str, Any]]:
    if record.get(key) in (None, "", []):
        return []
    try:
        return normalize_tools(record[key])
    except ValueError as err:
        raise DataError(f"{where}: field {key!r} (the tools) {err}.", "invalid tools") from None


def _check_call(content: str, where: str) -> None:
    try:
        parse_tool_calls(content)
    except ValueError as err:
        raise DataError(f"{where}: {err}.", "invalid function call") from None


def alpaca_to_messages(record: dict, columns: dict[str, str], where: str) -> Messages:
    """instruction + input as the user turn (joined with a newline, as LLaMA-Factory does), output as the reply,
    optional system, and history as earlier [user, assistant] pairs."""
    c = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
         "history": "history", **columns}
    msgs: Messages = []
    system = _text(record, c["system"], where, required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    history = record.get(c["history"]) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {c['history']!r} must be a list of [user, assistant] pairs, found "
                        f"{type(history).__name__}.", "invalid history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: field {c['history']!r}[{i}] must be a pair of two strings [user, assistant].",
                            "invalid history")
        if not pair[1].strip():
            raise DataError(f"{where}: field {c['history']!r}[{i}] has an empty assistant reply; there is nothing "
                            f"to train on.", "empty reply")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(record, c["prompt"], where)
    query = _text(record, c["query"], where, required=False)
    user = "\n".join(x for x in (prompt, query) if x)
    if not user.strip():
        raise DataError(f"{where}: fields {c['prompt']!r} and {c['query']!r} are both empty.", "empty prompt")
    response = _text(record, c["response"], where)
    if not response.strip():
        raise DataError(f"{where}: field {c['response']!r} is empty: an empty assistant reply has nothing to "
                        f"train on.", "empty reply")
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": response})
    return msgs


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "observation", "function_call": "function_call",
                   "function": "function_call", "tool": "observation", "ipython": "observation"}


def _openai_tool_calls(turn: dict, at: str) -> str:
    """An OpenAI assistant message's ``tool_calls`` as our function_call content (JSON list of name/arguments)."""
    calls = []
    for k, call in enumerate(turn["tool_calls"]):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{at}: tool_calls[{k}] needs a function with a string 'name'.", "invalid function call")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)  # the OpenAI API sends arguments as a JSON string
        calls.append({"name": fn["name"], "arguments": args})
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def sharegpt_to_messages(record: dict, entry: DatasetEntry, where: str) -> Messages:
    """sharegpt (`conversations` of from/value) or OpenAI (`messages` of role/content), tag names remappable."""
    c, t = entry.columns, entry.tags
    key = c.get("messages") or ("messages" if "messages" in record and "conversations" not in record
                                else "conversations")
    role_tag = t.get("role_tag", "role" if key == "messages" else "from")
    content_tag = t.get("content_tag", "content" if key == "messages" else "value")
    roles = dict(_SHAREGPT_ROLES)
    for tag, role in [("user_tag", "user"), ("assistant_tag", "assistant"), ("observation_tag", "observation"),
                      ("function_tag", "function_call"), ("system_tag", "system")]:
        if tag in t:
            roles[t[tag]] = role
    if key not in record:
        raise DataError(f"{where}: field {key!r} is missing (the list of turns).", "missing field")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns, found "
                        f"{type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}.",
                        "missing field")
    system = _text(record, c["system"], where, required=False) if "system" in c else ""
    msgs: Messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: a turn must be an object with {role_tag!r} and {content_tag!r}, found "
                            f"{type(turn).__name__}.", "invalid turn")
        if role_tag not in turn:
            raise DataError(f"{at}: field {role_tag!r} is missing.", "missing field")
        role = roles.get(turn[role_tag]) if isinstance(turn[role_tag], str) else None
        if role is None:
            raise DataError(f"{at}: {role_tag}={turn[role_tag]!r} is not a known role ({', '.join(sorted(roles))}); "
                            f"map it with 'tags' in dataset_info.json.", "unknown role")
        if role == "assistant" and isinstance(turn.get("tool_calls"), list) and turn["tool_calls"]:
            msgs.append({"role": "function_call", "content": _openai_tool_calls(turn, at)})
            continue
        if content_tag not in turn or turn[content_tag] is None:
            raise DataError(f"{at}: field {content_tag!r} is missing.", "missing field")
        content = turn[content_tag]
        if not isinstance(content, str):
            raise DataError(f"{at}: field {content_tag!r} must be a string, found {type(content).__name__}.",
                            "not a string")
        if role == "system":
            if i:
                raise DataError(f"{at}: a system turn may only come first.", "roles out of order")
            system = content  # a system turn overrides the system column, as in LLaMA-Factory
            continue
        if role == "function_call":
            _check_call(content, at)
        msgs.append({"role": role, "content": content})
    offset = 1 if turns and roles.get(turns[0].get(role_tag)) == "system" else 0
    for i, m in enumerate(msgs):
        expect = ("user", "observation") if i % 2 == 0 else ("assistant", "function_call")
        if m["role"] not in expect:
            raise DataError(f"{where}, {key}[{i + offset}]: role {m['role']!r} where {' or '.join(expect)} is "
                            f"expected: turns must alternate user/observation and assistant/function_call.",
                            "roles out of order")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}, {key}[{i + offset}]: the assistant reply is empty; there is nothing to "
                            f"train on.", "empty reply")
    if not msgs:
        raise DataError(f"{where}: field {key!r} has no user or assistant turns.", "missing field")
    if len(msgs) % 2:
        raise DataError(f"{where}, {key}[{len(msgs) - 1 + offset}]: the conversation ends with a "
                        f"{msgs[-1]['role']} turn; it must end with an assistant reply.", "roles out of order")
    return ([{"role": "system", "content": system}] if system else []) + msgs


def to_messages(record: Any, entry: DatasetEntry, where: str) -> tuple[Messages, list[dict[str, Any]]]:
    """One record -> (messages, tools). Raises DataError naming ``where`` and the field."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, found {type(record).__name__}.", "not an object")
    if entry.formatting == "alpaca":
        msgs = alpaca_to_messages(record, entry.columns, where)
    else:
        msgs = sharegpt_to_messages(record, entry, where)
    return msgs, _tools(record, entry.columns.get("tools", "tools"), where)
