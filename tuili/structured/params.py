"""StructuredOutputs: the one constraint a request's output must satisfy (JSON, regex, ...)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from tuili.errors import InvalidParameter

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one field set: `json` a JSON schema (dict or its text), `json_object` any JSON
    object, `regex`, `choice` one of these strings, `grammar` EBNF (xgrammar's / GBNF), or
    `structural_tag` xgrammar's structural tag (text), as tool calls use.
    `param` names the request field it came from, for errors."""
    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [f.name for f in fields(self) if f.name in KINDS and getattr(self, f.name)
                 not in (None, False)]
        if len(given) != 1:
            raise InvalidParameter(self.param, f"sets {given or 'nothing'}; set exactly one of "
                                               f"{list(KINDS)}")
        if self.choice is not None and (not self.choice or
                                        not all(isinstance(c, str) for c in self.choice)):
            raise InvalidParameter(self.param, "choice must be a non-empty list of strings")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidParameter(self.param, f"{name} must be a string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidParameter(self.param, "json must be a JSON schema (an object)")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached under."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        elif isinstance(value, tuple):
            value = json.dumps(list(value), ensure_ascii=False)
        elif value is True:
            value = ""
        return self.kind, value
