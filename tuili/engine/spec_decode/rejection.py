"""Lossless verification of drafts (Leviathan et al.'s speculative sampling), batched in torch.

Draft token d_i, drawn from q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) while all
before it were kept; at the first rejection the target's token is drawn from the residual
max(p_i - q_i, 0), normalised, and when every draft is kept a bonus token is drawn from p_k.
The tokens then follow the target's distribution p exactly, whatever q is. A greedy row's p is
one-hot at its argmax, so it keeps exactly the drafts equal to the target's greedy tokens.
"""

from __future__ import annotations

import torch


def rejection_sample(probs: torch.Tensor, offsets: torch.Tensor, num_drafts: torch.Tensor,
                     drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                     uniform: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: [rows, V] the target's distributions, request b's in rows offsets[b] ..
    offsets[b] + num_drafts[b]; drafts: [B, K] the guessed tokens (padded); draft_probs:
    [B, K, V] their distributions (None: each draft had probability 1); uniform: [B, K] in
    [0, 1); noise: [B, K + 1, V] Exp(1). -> (drafts kept per request [B], the final token [B])."""
    B, K = drafts.shape
    V = probs.shape[-1]
    steps = torch.arange(K + 1, device=probs.device)
    rows = offsets[:, None] + torch.minimum(steps[None, :], num_drafts[:, None])
    p = probs[rows]  # [B, K + 1, V]; rows past a request's drafts repeat its last (never used)
    p_draft = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = (draft_probs.gather(-1, drafts[..., None]).squeeze(-1) if draft_probs is not None
               else torch.ones_like(p_draft))
    # u * q < p keeps d with probability min(1, p / q), and never keeps a token p rules out.
    keep = (uniform * q_draft < p_draft) & (steps[None, :K] < num_drafts[:, None])
    kept = keep.long().cumprod(-1).sum(-1)
    b = torch.arange(B, device=probs.device)
    target = p[b, kept]  # [B, V]: the distribution the final token comes from
    at = kept.clamp(max=K - 1)
    if draft_probs is not None:
        q = draft_probs[b, at]
    else:
        q = torch.zeros_like(target).scatter_(-1, drafts[b, at][:, None], 1.0)
    rejected = (kept < num_drafts)[:, None]
    residual = torch.where(rejected, (target - q).clamp(min=0), target)
    # p == q to the last bit leaves nothing; then the draft was kept with probability 1 anyway
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, target, residual)
    final = (residual / noise[b, kept]).argmax(-1)  # exponential race: a draw from residual
    return kept, final

