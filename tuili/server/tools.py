"""A chat request's tools and tool_choice: checked, and `required` or a named function turned
into a grammar (xgrammar's structural tag for the parser's format) so that the call always
parses and its arguments match the function's parameter schema."""

from __future__ import annotations

from tuili.errors import InvalidParameter
from tuili.structured import StructuredOutputs

# the tool-call parser -> xgrammar's model format that writes the same text
_TAG_FORMATS = {"hermes": "qwen_3", "llama3_json": "llama"}


def tool_names(tools: list[dict] | None) -> list[str]:
    """The function names, each tool checked for OpenAI's shape."""
    names = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidParameter(f"tools[{i}]", 'must be {"type": "function", "function": '
                                                  '{"name": ..., "parameters": {...}}}')
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParameter(f"tools[{i}].function.name", "must be a non-empty string")
        if not isinstance(fn.get("parameters", {}), dict):
            raise InvalidParameter(f"tools[{i}].function.parameters", "must be a JSON schema "
                                                                      "(an object)")
        names.append(fn["name"])
    return names


def tool_choice_mode(tools: list[dict] | None, choice: str | dict | None) -> str | None:
    """'none', 'auto', 'required' or the named function; None without tools."""
    names = tool_names(tools)
    if choice is None:
        return "auto" if names else None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidParameter("tool_choice", f"got {choice!r}; allowed: 'none', 'auto', "
                                                  "'required' or {\"type\": \"function\", "
                                                  "\"function\": {\"name\": ...}}")
        if choice != "none" and not names:
            raise InvalidParameter("tool_choice", f"is {choice!r} but the request has no tools")
        return choice if names else None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidParameter("tool_choice", 'must be {"type": "function", "function": '
                                              '{"name": ...}}')
    if name not in names:
        raise InvalidParameter("tool_choice", f"names {name!r}, which is not among the tools "
                                              f"{names}")
    return name


def tool_constraint(tools: list[dict], mode: str, parser: str,
                    parallel: bool) -> StructuredOutputs | None:
    """The grammar that forces a call (`required`) or the named function's call; None for
    'auto' and 'none' (the model chooses)."""
    if mode in ("auto", "none"):
        return None
    import xgrammar as xgr

    choice = "required" if mode == "required" else {"type": "function",
                                                    "function": {"name": mode}}
    fmt = _TAG_FORMATS[parser]
    extra = {"reasoning": "disabled"} if fmt == "qwen_3" else {}
    try:
        tag = xgr.get_model_structural_tag(fmt, tools=tools, tool_choice=choice,
                                           parallel_tool_calls=parallel, **extra)
    except (ValueError, TypeError) as e:
        raise InvalidParameter("tools", f"cannot build a grammar for them: {e}") from e
    return StructuredOutputs(structural_tag=tag.model_dump_json(), param="tools")
