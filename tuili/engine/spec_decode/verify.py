"""The verify step's sampling: each request's k + 1 rows of target logits (after its last real
token and after each draft) become the tokens it keeps, penalties, min_tokens, temperature,
top-k/p, min-p, seeds and logprobs applied per row as the plain sampler applies them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuili.engine.request import Logprob, Request
from tuili.engine.sampler import (SamplingBatch, apply_penalties, as_logprobs, draw_seed,
                                  filtered_probs, logprob_tensors, row_argmax)
from tuili.engine.spec_decode.rejection import rejection_sample
from tuili.engine.transfer import to_device

# Seeded requests draw their verify noise from a stream apart from the plain sampler's.
_SALT = 0x5BD1E995


class RowView:
    """A request as its i-th verify row sees it: its tokens followed by the first i drafts (what
    SamplingBatch and apply_penalties read)."""

    def __init__(self, req: Request, extra: list[int]):
        self.params, self.seed, self.eos_token_ids = req.params, req.seed, req.eos_token_ids
        self.token_ids = req.token_ids + extra
        self.num_prompt_tokens = req.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class Verified:
    """One request's verify result: drafts kept, and the tokens it gains (kept drafts, then the
    target's own token)."""
    proposed: int
    kept: int
    tokens: list[int]
    logprobs: list[Logprob | None]


def target_probs(logits: torch.Tensor, views: list[RowView]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's distribution as the plain sampler would draw from it (one-hot at the argmax
    for greedy rows), the processed logits)."""
    batch = SamplingBatch.build(views, logits.shape[1])
    if batch.penalties:
        logits = apply_penalties(logits.to(torch.float32, copy=True), views)
    if batch.banned:
        logits = logits.to(torch.float32, copy=True) if not batch.penalties else logits
        logits.view(-1).index_fill_(0, to_device(batch.banned, torch.long, logits.device),
                                    float("-inf"))
    greedy = row_argmax(logits)
    one_hot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    one_hot.scatter_(-1, greedy[:, None], 1.0)
    if batch.all_greedy:
        return one_hot, logits
    probs = filtered_probs(logits, batch.params)
    is_greedy = to_device([p.temperature == 0 for p in batch.params], torch.bool, logits.device)
    return torch.where(is_greedy[:, None], one_hot, probs), logits


def draw_noise(reqs: list[Request], k: int, vocab: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform [B, k] and Exp(1) [B, k + 1, vocab]: a seeded request's from its seed and output
    position (reproducible whatever else is in the batch), the others' from `generator`."""
    uniform = torch.rand(len(reqs), k, generator=generator, device=device)
    noise = torch.empty(len(reqs), k + 1, vocab, device=device).exponential_(generator=generator)
    for b, r in enumerate(reqs):
        if r.seed is not None:
            own = torch.Generator(device=device).manual_seed(
                draw_seed(r.seed ^ _SALT, r.num_output_tokens))
            uniform[b] = torch.rand(k, generator=own, device=device)
            noise[b].exponential_(generator=own)
    return uniform, noise


def verify(logits: torch.Tensor, reqs: list[Request], generator: torch.Generator) -> list[Verified]:
    """logits: [sum(len(draft) + 1), vocab], request after request (each req.draft is set)."""
    device, vocab = logits.device, logits.shape[1]
    views = [RowView(r, r.draft.tokens[:i]) for r in reqs for i in range(len(r.draft) + 1)]
    probs, _ = target_probs(logits, views)
    counts = [len(r.draft) for r in reqs]
    k = max(counts)
    offsets = [0]
    for n in counts[:-1]:
        offsets.append(offsets[-1] + n + 1)
    drafts = to_device([r.draft.tokens + [0] * (k - len(r.draft)) for r in reqs], torch.long,
                       device)
    draft_probs = None
    if reqs[0].draft.probs is not None:  # one proposer per engine: all or none carry them
        draft_probs = torch.zeros(len(reqs), k, vocab, device=device)
        for b, r in enumerate(reqs):
            draft_probs[b, :len(r.draft)] = r.draft.probs
    uniform, noise = draw_noise(reqs, k, vocab, generator, device)
    kept, final = rejection_sample(probs, to_device(offsets, torch.long, device),
                                   to_device(counts, torch.long, device), drafts, draft_probs,
                                   uniform, noise)
    kept, final = kept.tolist(), final.tolist()
    out = []
    for b, r in enumerate(reqs):
        tokens = r.draft.tokens[:kept[b]] + [final[b]]
        out.append(Verified(counts[b], kept[b], tokens, [None] * len(tokens)))
    _add_logprobs(logits, reqs, offsets, out)
    return out


def _add_logprobs(logits: torch.Tensor, reqs: list[Request], offsets: list[int],
                  out: list[Verified]) -> None:
    """Logprobs of the kept tokens from the raw logits of their rows, as the plain sampler."""
    rows, targets, owners = [], [], []
    for b, r in enumerate(reqs):
        if r.params.logprobs is None:
            continue
        for j, t in enumerate(out[b].tokens):
            rows.append(offsets[b] + j)
            targets.append(t)
            owners.append((b, j))
    if not rows:
        return
    top_n = max(reqs[b].params.logprobs for b, _ in owners)
    index = to_device(rows, torch.long, logits.device)
    parts = [t.tolist() for t in logprob_tensors(logits[index],
                                                 to_device(targets, torch.long, logits.device),
                                                 top_n)]
    for (b, j), lp in zip(owners, as_logprobs(targets, *parts)):
        lp.top = lp.top[:reqs[b].params.logprobs]
        out[b].logprobs[j] = lp
