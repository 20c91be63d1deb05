"""What a request must satisfy before it is queued, checked by the engine and, ahead of it, by
the front that feeds it: prompt ids of this vocabulary, stop ids inside it, a grammar that
compiles."""

from __future__ import annotations

import threading

from tuili.errors import InvalidParameter
from tuili.models.tokenizer import Tokenizer
from tuili.sampling_params import SamplingParams, shown


def encode_prompt(tokenizer: Tokenizer, vocab: int, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids: text tokenized, ids checked to be this vocabulary's."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if not set(map(type, prompt)) <= {int}:  # bool and other int subclasses are out
        raise InvalidParameter("prompt", "must be a string or a list of token ids")
    if prompt and (min(prompt) < 0 or max(prompt) >= vocab):
        bad = [t for t in prompt if not 0 <= t < vocab]
        raise InvalidParameter("prompt", f"token ids {bad[:5]} are outside [0, {vocab})")
    return list(prompt)


class ParamsCheck:
    """What SamplingParams cannot check alone: the values that must be this vocabulary's ids, and
    a structured-output constraint that must compile (compiled once, cached)."""

    def __init__(self, tokenizer: Tokenizer, vocab: int, eos_token_ids: frozenset[int]):
        self.tokenizer, self.vocab, self.eos_token_ids = tokenizer, vocab, eos_token_ids
        self._grammars = None  # GrammarMatchers, made by the first structured-output request
        self._lock = threading.Lock()  # the server's threads compile too

    def __call__(self, params: SamplingParams, compile: bool = True) -> None:
        """Raise InvalidParameter for what cannot run; with compile, also compile (and cache)
        the structured-output grammar, whose errors are raised here too."""
        bad = [t for t in params.stop_token_ids if t >= self.vocab]
        if bad:  # the sampler indexes logits with them
            raise InvalidParameter("stop_token_ids", f"token ids {shown(bad[:5])} are outside "
                                                     f"[0, {self.vocab})")
        if compile and params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    @property
    def made_grammars(self):
        """The matchers if a structured-output request made them, else None (no lock taken)."""
        return self._grammars

    @property
    def grammars(self):
        """The structured-output matchers (tuili.structured.matchers.GrammarMatchers)."""
        with self._lock:
            if self._grammars is None:
                from tuili.structured.matchers import GrammarMatchers

                self._grammars = GrammarMatchers(self.tokenizer, self.vocab, self.eos_token_ids)
            return self._grammars
