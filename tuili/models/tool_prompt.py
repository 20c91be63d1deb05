"""Tools for chat templates that know none (SmolLM2's, for one): the functions go into the
system message and past calls and results into the messages, in the Hermes format that the
`hermes` tool-call parser reads back."""

from __future__ import annotations

import json


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and ("tools" in template or "tool_calls" in template)


def with_tools_in_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with the tools described up front, assistant tool_calls written as
    `<tool_call>` blocks and tool results as `<tool_response>` blocks."""
    out = [_message(m) for m in messages]
    if tools:
        listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        prompt = ("You may call one or more functions to answer. The functions, as JSON "
                  f"schemas:\n<tools>\n{listing}\n</tools>\nTo call a function, reply with "
                  "one block per call:\n<tool_call>\n{\"name\": <function name>, "
                  "\"arguments\": <arguments object>}\n</tool_call>")
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _message(m: dict) -> dict:
    if m.get("role") == "assistant" and m.get("tool_calls"):
        blocks = [m.get("content") or ""]
        for call in m["tool_calls"]:
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            args = fn.get("arguments", {})
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                pass  # kept as the string it was
            blocks.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args},
                                                       ensure_ascii=False) + "\n</tool_call>")
        return {**m, "content": "\n".join(b for b in blocks if b)}
    if m.get("role") == "tool":
        return {**m, "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    return m
