"""Logits -> tokens for a batch: penalties, min_tokens, temperature, top-k/p, min-p, seeds, logprobs.

Random rows sample by the exponential race (argmax of p / q with q ~ Exp(1)), which draws from p
exactly. A request with a seed draws its q from its own generator, so its tokens do not depend
on what else is in the batch.
"""

from __future__ import annotations

import torch

from tuili.engine.request import Logprob, Request


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[Logprob | None]]:
        logits = logits.float()
        raw = logits
        params = [r.params for r in reqs]
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = apply_penalties(logits.clone(), reqs)
        banned = [(i, _stop_ids(r)) for i, r in enumerate(reqs)
                  if r.num_output_tokens < r.params.min_tokens]
        if banned:
            logits = logits.clone() if logits is raw else logits
            for i, ids in banned:
                logits[i, ids] = float("-inf")
        tokens = logits.argmax(dim=-1)
        if not all(p.temperature == 0 for p in params):
            sampled = self._sample(logits, reqs)
            greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()
        logprobs: list[Logprob | None] = [None] * len(reqs)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = torch.tensor(wanted, device=logits.device)
            found = token_logprobs(raw[rows], tokens[rows], max(params[i].logprobs for i in wanted))
            for i, lp in zip(wanted, found):
                lp.top = lp.top[: params[i].logprobs]
                logprobs[i] = lp
        return token_list, logprobs

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.params for r in reqs]
        device = logits.device
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits / temps[:, None]
        if any(p.top_k or p.top_p < 1 for p in params):
            logits = top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        return (probs / q).argmax(dim=-1)


def _stop_ids(req: Request) -> list[int]:
    ids = set(req.params.stop_token_ids)
    if not req.params.ignore_eos:
        ids |= req.eos_token_ids
    return sorted(ids)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Repetition penalty over prompt and output (HF's rule); presence/frequency over output."""
    B, V = logits.shape
    device = logits.device
    out_counts = torch.zeros(B, V, device=device)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    for i, r in enumerate(reqs):
        out = torch.tensor(r.output_token_ids, dtype=torch.long, device=device)
        out_counts[i].index_add_(0, out, torch.ones(len(out), device=device))
        seen[i, torch.tensor(r.token_ids, dtype=torch.long, device=device)] = True
    rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=device)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=device)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in reqs], device=device)[:, None]
    return logits - freq * out_counts - pres * (out_counts > 0).float()


# Nucleus candidates taken with topk before falling back to a full sort of the vocabulary.
TOP_P_CANDIDATES = 1024


def top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask all but each row's top_k tokens (0 = all) and, of those, its smallest set holding
    top_p of their probability. Only the best max(top_k) tokens, or TOP_P_CANDIDATES when a row
    has no top_k, are ranked (topk, no full sort); a full sort runs only when those candidates
    hold less than some row's top_p."""
    B, V = logits.shape
    k = [kk if 0 < kk < V else V for kk in top_k]
    width = min(V, max(min(kk, TOP_P_CANDIDATES) if kk == V else kk for kk in k))
    values, order = logits.topk(width, dim=-1) if width < V else logits.sort(-1, descending=True)
    rank = torch.arange(width, device=logits.device)[None, :]
    drop = rank >= torch.tensor(k, device=logits.device)[:, None]
    values = values.masked_fill(drop, float("-inf"))
    # Each row's probabilities over its top_k set, normalised over the whole set even where only
    # part of it is among the candidates.
    full_k = torch.tensor([kk == V for kk in k], device=logits.device)[:, None]
    norm = torch.where(full_k, logits.logsumexp(-1, keepdim=True), values.logsumexp(-1, keepdim=True))
    probs = (values - norm).exp()
    p = torch.tensor([pp if pp < 1 else 2.0 for pp in top_p], device=logits.device)[:, None]
    if width < V and bool(((probs.sum(-1, keepdim=True) < p) & full_k & (p <= 1)).any()):
        return top_k_top_p_sorted(logits, k, p)
    # Drop a token when the tokens ranked above it already hold top_p of the mass.
    drop |= (probs.cumsum(dim=-1) - probs) >= p
    values = values.masked_fill(drop, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter(-1, order, values)
    return torch.where(full_k & (p > 1), logits, out)  # rows with neither filter keep every token


def top_k_top_p_sorted(logits: torch.Tensor, k: list[int], p: torch.Tensor) -> torch.Tensor:
    """top_k_top_p over a full sort of each row (the fallback)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= torch.tensor(k, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> list[Logprob]:
    """Per row: the target token's logprob and rank, and the top_n alternatives."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, targets[:, None])
    ranks = (lp > chosen).sum(dim=-1) + 1
    top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], targets[:, None][:, :0])
    out = []
    for t, c, r, ids, vals in zip(targets.tolist(), chosen[:, 0].tolist(), ranks.tolist(),
                                  top_ids.tolist(), top_vals.tolist()):
        out.append(Logprob(t, c, r, list(zip(ids, vals))))
    return out
