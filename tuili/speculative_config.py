"""SpeculativeConfig: `speculative_config` (vLLM's shape), parsed and checked once at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass

from tuili.errors import InvalidParameter

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# Decodes in one step above which speculation is off for that step (BENCHMARKS.md, "speculative
# decoding: when it pays"): on the 2-core CPU a verify row costs about a decode row, so beyond a
# few sequences the guessed rows crowd out real ones. On an H100 (8B shape, k = 4, acceptance
# 0.7) speculation stopped paying at batch 16 (fifteenth session): the same 4 holds there.
DEFAULT_DISABLE_BY_BATCH_SIZE = 4
# A request whose guesses are kept less often than this stops guessing for a while: a verify
# step of k + 1 rows must gain more tokens than it costs in decode steps. On the 2-core CPU a
# verify of 4 rows costs ~1.9 decode steps, break-even at ~30% acceptance for k = 3; on a GPU a
# verify row is nearly free (benchmarks/gpu_spec_decode.py measures it).
DEFAULT_MIN_ACCEPTANCE = {"cpu": 0.3, "cuda": 0.05}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram | draft_model | eagle (EAGLE-1/2 or -3 head) | eagle3
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: the shortest suffix looked up in the context
    prompt_lookup_max: int = 4  # ngram: the longest
    model: str | None = None  # draft_model / eagle / eagle3: the checkpoint (a folder)
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    min_acceptance_rate: float | None = None  # None: DEFAULT_MIN_ACCEPTANCE of the device

    @classmethod
    def parse(cls, value: str | dict | None) -> SpeculativeConfig | None:
        """From LLM(speculative_config={...}) or --speculative-config '{...}'."""
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidParameter("speculative_config", f"is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise InvalidParameter("speculative_config", "must be a JSON object")
        value = dict(value)
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "model", "disable_by_batch_size", "min_acceptance_rate"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidParameter("speculative_config",
                                   f"unknown keys {unknown}; allowed: {sorted(known)}")
        method = value.pop("method", None) or ("draft_model" if value.get("model") else None)
        if method == "draft":
            method = "draft_model"
        if method not in METHODS:
            raise InvalidParameter("speculative_config.method",
                                   f"got {method!r}, must be one of {', '.join(METHODS)} (or give "
                                   "a draft 'model')")
        value.setdefault("num_speculative_tokens", None)
        config = cls(method=method, **value)
        config._check()
        return config

    def _check(self) -> None:
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidParameter(f"speculative_config.{name}",
                                       f"got {getattr(self, name)!r}, must be {allowed}")

        k = self.num_speculative_tokens
        need("num_speculative_tokens", type(k) is int and 1 <= k <= 16, "an integer in [1, 16]")
        need("prompt_lookup_min", type(self.prompt_lookup_min) is int
             and self.prompt_lookup_min >= 1, "an integer >= 1")
        need("prompt_lookup_max", type(self.prompt_lookup_max) is int
             and self.prompt_lookup_max >= self.prompt_lookup_min, ">= prompt_lookup_min")
        need("model", (self.model is not None) == (self.method != "ngram"),
             "a path for a draft model or an EAGLE head, none for ngram")
        a = self.min_acceptance_rate
        need("min_acceptance_rate", a is None or (isinstance(a, (int, float)) and 0 <= a <= 1),
             "a number in [0, 1]")
        need("disable_by_batch_size", type(self.disable_by_batch_size) is int
             and self.disable_by_batch_size >= 1, "an integer >= 1")
