"""SamplingParams: how one request turns logits into tokens and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from tuili.errors import InvalidParameter

MAX_LOGPROBS = 20


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidParameter(name, f"got {getattr(self, name)!r}, must be {allowed}")

        _check_types(self)
        check("n", self.n >= 1, "an integer >= 1")
        check("temperature", self.temperature >= 0, ">= 0 (0 means greedy)")
        check("top_p", 0 < self.top_p <= 1, "in (0, 1]")
        check("top_k", self.top_k >= 0, "0 or -1 (off) or a positive integer")
        check("min_p", 0 <= self.min_p <= 1, "in [0, 1]")
        check("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 means off)")
        check("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]")
        check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]")
        check("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "an integer >= 1 or None")
        check("min_tokens", self.min_tokens >= 0, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens", f"got {self.min_tokens}, must be <= max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(name, value is None or 0 <= value <= MAX_LOGPROBS, f"None or in [0, {MAX_LOGPROBS}]")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", "stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", f"got {self.stop_token_ids}, ids must be >= 0")

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
            raise InvalidParameter(f.name, f"got {value!r}, must be an integer")
        if f.name in _OPTIONAL_INT_FIELDS and value is not None and not is_int:
            raise InvalidParameter(f.name, f"got {value!r}, must be an integer or None")
        if f.name in _FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidParameter(f.name, f"got {value!r}, must be a number")
    if not all(isinstance(s, str) for s in params.stop):
        raise InvalidParameter("stop", f"got {params.stop!r}, must be strings")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in params.stop_token_ids):
        raise InvalidParameter("stop_token_ids", f"got {params.stop_token_ids!r}, must be integers")
