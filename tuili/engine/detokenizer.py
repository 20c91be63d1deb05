"""Incremental detokenization with stop strings.

`tokenizers`' DecodeStream holds back bytes until they form whole UTF-8 characters. On top of it
this keeps the output text, cuts it at a stop string, and holds back a tail that could still
grow into a stop string, so streamed text never has to be taken back.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tuili.models.tokenizer import Tokenizer
from tuili.sampling_params import SamplingParams

PROMPT_CONTEXT = 6  # prompt tokens fed first, so the first output token decodes in context


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=prompt_ids[-PROMPT_CONTEXT:],
                                   skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0  # characters of text already handed out

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token's text; return the stop string it completed, if any."""
        piece = self.stream.step(self.tokenizer.backend, token_id)
        if not piece:
            return None
        start = len(self.text)
        self.text += piece
        if not (check_stop and self.stops):
            return None
        # A stop string may straddle the boundary with earlier text.
        window_start = max(0, start - self.hold)
        for stop in self.stops:
            at = self.text.find(stop, window_start)
            if at != -1:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                return stop
        return None

    def take_delta(self, finished: bool) -> str:
        """New text since the last call; while unfinished, keep back a possible stop-string start."""
        end = len(self.text) if finished or not self.stops else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
