"""SamplingParams: how one request turns logits into tokens and when it stops."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field, fields, replace

from tuili.errors import InvalidParameter
from tuili.structured.params import StructuredOutputs

MAX_LOGPROBS = 20
SEED_RANGE = (-2**63, 2**63 - 1)  # a signed 64-bit integer, as OpenAI's API and torch take it
# Below this a temperature scales float32 logits past their range (the draw turns to NaN); it is
# greedy in all but name long before. Smaller positive values are raised to it, as vLLM does.
MIN_TEMPERATURE = 1e-2
REPETITION_PENALTY_RANGE = (1e-2, 1e2)  # beyond it logits overflow float32 the same way


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # JSON schema, regex, choice, grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    def _validate(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidParameter(name, f"got {shown(getattr(self, name))}, must be {allowed}")

        _check_types(self)
        check("n", self.n >= 1, "an integer >= 1")
        check("temperature", self.temperature >= 0, "a finite number >= 0 (0 means greedy)")
        check("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        check("top_k", self.top_k >= 0, "0 or -1 (off) or a positive integer")
        check("min_p", 0 <= self.min_p <= 1, "in [0, 1]")
        lo, hi = REPETITION_PENALTY_RANGE
        check("repetition_penalty", lo <= self.repetition_penalty <= hi,
              f"in [{lo}, {hi:g}] (1 means off)")
        check("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]")
        check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]")
        check("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "an integer >= 1 or None")
        check("min_tokens", self.min_tokens >= 0, "an integer >= 0")
        lo, hi = SEED_RANGE
        check("seed", self.seed is None or lo <= self.seed <= hi,
              f"None or a 64-bit signed integer, in [{lo}, {hi}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens", f"got {self.min_tokens}, must be <= max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(name, value is None or 0 <= value <= MAX_LOGPROBS, f"None or in [0, {MAX_LOGPROBS}]")
        if not (self.structured_outputs is None
                or isinstance(self.structured_outputs, StructuredOutputs)):
            raise InvalidParameter("structured_outputs", "must be a StructuredOutputs or None")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids",
                                   f"got {shown(self.stop_token_ids)}, ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_defaults(self, **overrides) -> SamplingParams:
        return replace(self, **overrides)


_INT_FIELDS = {"n", "top_k", "min_tokens"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"}
_OPTIONAL_INT_FIELDS = {"seed", "max_tokens", "logprobs", "prompt_logprobs"}


def _check_types(params: SamplingParams) -> None:
    for f in fields(params):
        value = getattr(params, f.name)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if f.name in _INT_FIELDS and not is_int:
            raise InvalidParameter(f.name, f"got {shown(value)}, must be an integer")
        if f.name in _OPTIONAL_INT_FIELDS and value is not None and not is_int:
            raise InvalidParameter(f.name, f"got {shown(value)}, must be an integer or None")
        if f.name in _FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidParameter(f.name, f"got {shown(value)}, must be a number")
        if f.name in _FLOAT_FIELDS and not _finite(value):  # JSON's 1e400 reads as inf
            raise InvalidParameter(f.name, f"got {shown(value)}, must be a finite number")
    if not all(isinstance(s, str) for s in params.stop):
        raise InvalidParameter("stop", f"got {shown(params.stop)}, must be strings")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in params.stop_token_ids):
        raise InvalidParameter("stop_token_ids",
                               f"got {shown(params.stop_token_ids)}, must be integers")


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def shown(value: object, limit: int = 60) -> str:
    """repr(value), cut to about `limit` characters: errors quote what was sent, not all of it."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = reprlib.repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit inside a list
        return f"a {type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[:limit] + "..."
