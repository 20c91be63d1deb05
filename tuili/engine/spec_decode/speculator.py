"""Speculator: which decodes guess this step and how far (the per-step off switch, token budget,
length limits), the proposer that guesses, the verify call and the acceptance counters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.engine.request import Request
from tuili.speculative_config import DEFAULT_MIN_ACCEPTANCE, SpeculativeConfig

# Each request's running acceptance: an exponential average over its verify steps (this weight
# on the newest); while below the minimum it rises by RECOVERY a step, so it tries again later.
_WEIGHT, _RECOVERY = 0.3, 0.05
from tuili.engine.spec_decode.verify import Verified, verify


@dataclass
class SpecStats:
    """Counters over the engine's life, named as vLLM's spec_decode metrics."""
    num_drafts: int = 0  # requests' verify steps
    num_draft_tokens: int = 0  # tokens proposed
    num_accepted_tokens: int = 0  # of those, kept
    num_steps_off: int = 0  # steps whose batch was too large to speculate

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens gained per verify step: the kept drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def summary(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.acceptance_rate,
                "mean_acceptance_length": self.mean_acceptance_length,
                "num_steps_off": self.num_steps_off}

    def format(self) -> str:
        return (f"speculative decoding: {self.num_draft_tokens} tokens proposed, "
                f"{self.num_accepted_tokens} accepted ({self.acceptance_rate:.1%}), mean "
                f"acceptance length {self.mean_acceptance_length:.2f} over {self.num_drafts} "
                f"verify steps; {self.num_steps_off} steps too large to speculate")


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int,
                 device_type: str = "cpu"):
        self.config, self.proposer = config, proposer
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self.min_acceptance = (config.min_acceptance_rate if config.min_acceptance_rate is not None
                               else DEFAULT_MIN_ACCEPTANCE.get(device_type, 0.05))
        self.acceptance: dict[str, float] = {}  # request id -> running acceptance
        self.observing = True  # whether this step's hidden states are kept (observe)

    def plan(self, decodes: list[Request], budget: int) -> None:
        """Set the draft of each decode that speculates this step (None for the others)."""
        for r in decodes:
            r.draft = None
        self.observing = len(decodes) <= self.config.disable_by_batch_size
        if not self.observing:
            self.stats.num_steps_off += 1  # verify rows would cost more than they save
            return
        spare = budget - len(decodes)  # every decode takes one token first
        reqs, caps = [], []
        for r in decodes:
            cap = min(self._cap(r), spare)
            if cap > 0 and self._speculates(r) and self._pays(r):
                reqs.append(r)
                caps.append(cap)
                spare -= cap
        if reqs:
            for r, draft in zip(reqs, self.proposer.propose(reqs, caps)):
                r.draft = draft

    def _pays(self, r: Request) -> bool:
        """Whether the request's guesses have been kept often enough to be worth a verify."""
        rate = self.acceptance.get(r.request_id)
        if rate is None or rate >= self.min_acceptance:
            return True
        self.acceptance[r.request_id] = rate + _RECOVERY
        return False

    def _speculates(self, r: Request) -> bool:
        # A pending token is not known yet (async scheduling); a grammar's mask would have to
        # follow every draft, so structured output decodes one token at a time.
        return not r.num_pending and r.params.structured_outputs is None

    def _cap(self, r: Request) -> int:
        """Most drafts such that the tokens gained (drafts + 1) stay within the length limits."""
        cap = min(self.config.num_speculative_tokens, self.max_model_len - r.num_tokens - 1)
        if r.params.max_tokens is not None:
            cap = min(cap, r.params.max_tokens - r.num_output_tokens - 1)
        return cap

    def observe(self, batch, tapped: torch.Tensor) -> None:
        """The target's tapped hidden states of a step's rows, for a proposer that reads them.
        Not kept from steps too large to speculate: keeping them per request would cost every
        such step host time, and the positions they miss reach the head with no state (its
        guesses there are worse, never wrong)."""
        if self.observing:
            self.proposer.observe(batch, tapped)

    def reset_stats(self) -> None:
        self.stats = SpecStats()

    def verify(self, logits: torch.Tensor, reqs: list[Request],
               generator: torch.Generator) -> list[Verified]:
        verified = verify(logits, reqs, generator)
        s = self.stats
        for r, v in zip(reqs, verified):
            rate = self.acceptance.get(r.request_id, 1.0)
            self.acceptance[r.request_id] = (1 - _WEIGHT) * rate + _WEIGHT * v.kept / v.proposed
            s.num_drafts += 1
            s.num_draft_tokens += v.proposed
            s.num_accepted_tokens += v.kept
        return verified

    def release(self, req: Request) -> None:
        """A request is finished: the proposer forgets it."""
        req.draft = None
        self.acceptance.pop(req.request_id, None)
        self.proposer.release(req)
