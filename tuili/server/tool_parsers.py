"""Tool calls out of generated text: Hermes/Qwen `<tool_call>{...}</tool_call>` blocks and
Llama-3.x JSON calls, picked from the chat template or --tool-call-parser.

Both parsers read the whole text so far and return a prefix-stable snapshot (content, calls
with the name once complete and the arguments' JSON text as far as it goes), so streaming
sends the difference between two snapshots and the final text parses the same way."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

PARSERS = ("hermes", "llama3_json")

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def pick_parser(chosen: str, chat_template: str | None) -> str:
    """--tool-call-parser, or from the template: Llama-3's JSON calls name `parameters` and
    `<|python_tag|>`; Hermes/Qwen templates (and those without tools: tuili's fallback prompt
    is Hermes-style) write `<tool_call>`."""
    if chosen != "auto":
        return chosen
    t = chat_template or ""
    if "<tool_call>" not in t and ("<|python_tag|>" in t or '"parameters"' in t):
        return "llama3_json"
    return "hermes"


@dataclass
class ToolCallText:
    name: str | None  # None until its closing quote is generated
    arguments: str  # the arguments' JSON text so far
    complete: bool  # the call's text has ended


@dataclass
class Snapshot:
    content: str
    calls: list[ToolCallText] = field(default_factory=list)


def snapshot(parser: str, text: str, final: bool) -> Snapshot:
    """What `text` says so far; with final, whatever is open is closed."""
    return _hermes(text, final) if parser == "hermes" else _llama3(text, final)


def final_calls(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """The finished text as (content or None, OpenAI tool_calls); when a call is not valid
    JSON with a name, the whole text is content (as the model wrote it)."""
    snap = snapshot(parser, text, final=True)
    if not all(c.name is not None and _is_json(c.arguments) for c in snap.calls):
        return text or None, []
    calls = [openai_call(c.name, c.arguments) for c in snap.calls]
    return (snap.content.strip() or None) if calls else (text or None), calls


def openai_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StreamingToolCalls:
    """One choice's stream: each new text gives the content delta and OpenAI
    `delta.tool_calls` entries (first the id and name, then argument fragments)."""

    def __init__(self, parser: str):
        self.parser = parser
        self.text = ""
        self.sent_content = 0
        self.sent: list[tuple[str, int]] = []  # per call: its id, argument characters sent

    def add(self, delta: str, final: bool) -> tuple[str, list[dict]]:
        self.text += delta
        snap = snapshot(self.parser, self.text, final)
        content = snap.content[self.sent_content:]
        self.sent_content = len(snap.content)
        out = []
        for i, call in enumerate(snap.calls):
            if call.name is None:
                break  # later calls wait for this one's name
            if i == len(self.sent):
                self.sent.append((new_call_id(), 0))
                out.append({"index": i, "id": self.sent[i][0], "type": "function",
                            "function": {"name": call.name, "arguments": ""}})
            call_id, n = self.sent[i]
            if len(call.arguments) > n:
                out.append({"index": i, "function": {"arguments": call.arguments[n:]}})
                self.sent[i] = (call_id, len(call.arguments))
        return content, out

    @property
    def called(self) -> bool:
        return bool(self.sent)


def _hermes(text: str, final: bool) -> Snapshot:
    begin, end = "<tool_call>", "</tool_call>"
    snap, pos = Snapshot(""), 0
    while True:
        i = text.find(begin, pos)
        if i < 0:
            tail = text[pos:]
            snap.content += tail if final else tail[:len(tail) - _held_back(tail, begin)]
            return snap
        snap.content += text[pos:i]
        j = text.find(end, i + len(begin))
        body = text[i + len(begin):j if j >= 0 else len(text)]
        snap.calls.append(_call(body, complete=j >= 0 or final))
        if j < 0:
            return snap
        pos = j + len(end)


def _llama3(text: str, final: bool) -> Snapshot:
    tag = "<|python_tag|>"
    body = text.lstrip()
    if body.startswith(tag):
        body = body[len(tag):].lstrip()
    if not final and (not body or tag.startswith(body)):
        return Snapshot("")  # not known yet whether it is a call
    if not body:
        return Snapshot(text)
    if not body.startswith("{"):
        return Snapshot(text)
    snap, pos = Snapshot(""), 0
    while pos < len(body) and body[pos] == "{":
        end = _value_end(body, pos)
        snap.calls.append(_call(body[pos:end or len(body)], complete=end is not None or final))
        if end is None:
            break
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return snap


def _call(body: str, complete: bool) -> ToolCallText:
    """A call object's text (maybe cut short): its name once complete, its arguments so far."""
    name = _NAME.search(body)
    args = _ARGS.search(body)
    arguments = ""
    if args is not None:
        start = args.end()
        end = _value_end(body, start)
        if end is not None:
            arguments = body[start:end]
        elif body[start:start + 1] in ("{", "["):
            arguments = body[start:]  # an open object or array: what there is so far
        elif complete:
            arguments = body[start:].rstrip().removesuffix("}").rstrip()
    return ToolCallText(json.loads(f'"{name.group(1)}"') if name else None, arguments,
                        complete)


def _value_end(text: str, start: int) -> int | None:
    """The end of the JSON object or array opening at text[start], or None while it is open
    (or when it is not an object or array)."""
    if text[start:start + 1] not in ("{", "["):
        return None
    depth, in_string, escaped = 0, False, False
    for k in range(start, len(text)):
        ch = text[k]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
    return None


def _held_back(text: str, marker: str) -> int:
    """How many of text's last characters could begin `marker` (kept until known)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
