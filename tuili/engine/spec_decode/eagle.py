"""EAGLE proposer: a draft head (models/eagle.py) guesses from the target's hidden states, which
the target's forward hands out through a HiddenTap (its last state after the final norm for
EAGLE-1/2, three layers' residual streams for EAGLE-3). Everything else is the draft model's:
own paged KV cache and runner, k - 1 steps after a catch-up, drafts drawn from the head's
distribution with the request's sampling parameters (lossless through rejection sampling).

The head's entry p reads token p + 1 and the target's state at position p. The target's states
of every step (prefill chunks, decodes, verify rows) are kept per request until the head has
read them; those of rejected drafts are dropped when the request's tokens show how many were
kept. Positions the target never computed (a prefix-cache hit) enter with a zero state: the
head's guesses there are worse, never wrong, as the target verifies them.
"""

from __future__ import annotations

import torch

from tuili.engine.request import Request
from tuili.engine.scheduler import Batch
from tuili.engine.spec_decode.draft_model import DraftModelProposer, DraftSeq
from tuili.errors import InvalidParameter
from tuili.layers.hidden_tap import HiddenTap
from tuili.models.eagle import eagle3_tap_layers, load_head
from tuili.speculative_config import SpeculativeConfig


class EagleSeq(DraftSeq):
    """A request as the head sees it: token_ids are the target's shifted by one (entry p holds
    token p + 1), num_real the entries whose state is the target's; the target's states for
    positions hidden_start .. hidden_start + count - 1 not read yet (and the last one read, for
    a rerun) in the first rows of `buf`, which grows by doubling (no copy of it per step)."""

    def __init__(self, request_id: str):
        super().__init__(request_id)
        self.buf: torch.Tensor | None = None
        self.hidden_start = self.count = 0
        self.last_out: torch.Tensor | None = None  # the head's state after its last entry

    def follow(self, req: Request) -> None:
        """Drop the entries of guesses; entries 0 .. len(tokens) - 2 are real now."""
        n = len(req.token_ids)
        # the last real entry is always run (again): its logits give the first draft
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_real, n - 2)
        self.token_ids = list(req.token_ids[1:])
        self.num_real = n - 1
        # states past n - 2 were computed on rejected drafts
        self.count = min(self.count, max(0, n - 1 - self.hidden_start))

    def observe(self, start: int, states: torch.Tensor) -> None:
        """The target's states at positions start.. (a recompute of ones read already is
        dropped); they replace whatever was kept from `start` on."""
        first = max(start, min(self.num_computed_tokens, self.num_real) - 1, 0)
        states = states[first - start:]
        if not len(states):
            return
        if not self.hidden_start <= first <= self.hidden_start + self.count:
            self.hidden_start, self.count = first, 0  # a gap: what came before is no use
        at = first - self.hidden_start
        need = at + len(states)
        if self.buf is None or need > len(self.buf):
            grown = states.new_empty(max(need, 2 * self.count, 16), states.shape[-1])
            if self.buf is not None:
                grown[:at] = self.buf[:at]
            self.buf = grown
        self.buf[at:need] = states
        self.count = need

    def inputs(self, start: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """The head's input states for entries start .. start + n - 1: the target's for real
        entries (zero where it has none), the head's own last output for a guess."""
        if start >= self.num_real:
            return self.last_out
        out = like.new_zeros(n, like.shape[-1])
        hs = self.hidden_start
        lo, hi = max(start, hs), min(start + n, hs + self.count)
        if lo < hi:
            out[lo - start:hi - start] = self.buf[lo - hs:hi - hs]
        drop = min(start + n - 1 - hs, self.count)  # read; the last entry may run again
        if drop > 0:
            rest = self.count - drop
            self.buf[:rest] = self.buf[drop:self.count].clone()
            self.hidden_start, self.count = hs + drop, rest
        return out


class EagleProposer(DraftModelProposer):
    def __init__(self, spec: SpeculativeConfig, config, target, max_model_len: int,
                 num_blocks: int, dtype: torch.dtype, device: torch.device, eager: bool = True):
        if not hasattr(target, "tap"):
            raise InvalidParameter("speculative_config.method",
                                   f"EAGLE heads read a Llama-family target's hidden states; "
                                   f"{target.config.architecture} hands none out")
        if config.tensor_parallel_size > 1:
            raise InvalidParameter("speculative_config.method",
                                   "EAGLE heads run on one GPU; use tensor_parallel_size 1 or "
                                   "ngram")
        self.head = load_head(spec.model, spec.method, target, dtype, device)
        layers = target.config.num_layers
        self.tap = HiddenTap(eagle3_tap_layers(layers) if self.head.eagle3 else [layers])
        target.tap = self.tap  # before the target's CUDA graphs are captured: they take it too
        self._start(self.head, self.head.config, spec, config, max_model_len, num_blocks, dtype,
                    device, eager)
        self._like = self.head.fc.weight.new_zeros(1, self.head.config.hidden_size)

    def _seq(self, req: Request) -> EagleSeq:
        seq = self.seqs.get(req.request_id)
        if seq is None:
            seq = self.seqs[req.request_id] = EagleSeq(req.request_id)
        return seq

    def observe(self, batch: Batch, tapped: torch.Tensor) -> None:
        """The target's step just queued: keep each request's states of the rows it ran."""
        states = self.head.fuse(tapped) if self.head.eagle3 else tapped
        row = 0
        for req, n, start in zip(batch.requests, batch.num_new, batch.starts):
            if req.pooling is None and req.params.structured_outputs is None:  # never guess
                self._seq(req).observe(start, states[row:row + n])
            row += n

    def _execute(self, batch: Batch) -> torch.Tensor:
        self.head.stage(torch.cat([seq.inputs(start, n, self._like) for seq, n, start in
                                   zip(batch.requests, batch.num_new, batch.starts)]))
        out = self.runner.execute(batch)
        # the head's output states of its sampled rows (one per sequence); a copy, as the next
        # graph replay rewrites them
        states = out.tapped[:len(batch.requests)].clone()
        for row, seq in enumerate(batch.requests):
            seq.last_out = states[row:row + 1]
        return out.sample_logits
