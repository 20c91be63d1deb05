"""Plain-torch mixture of experts: top-k routing and the experts' SiLU-gated MLPs, the CPU path and
the oracle of triton_moe.

Expert weights are stacked: w13 [experts, 2 * inter, hidden] (gate rows, then up rows) and
w2 [experts, hidden, inter]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuili.layers.linear import matmul


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, top_k] float32, expert ids [tokens, top_k]): the softmax over all experts
    (in float32, as HF does), its top k, renormalised to sum to 1 if the model says so."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for each token t; x: [tokens, hidden].
    Only the experts some token chose are read, each once for all of its tokens."""
    tokens, top_k = ids.shape
    # each (token, k) slot's weighted expert output, summed over k at the end (index_add_ is
    # ~100x slower than these copies on a busy 2-core CPU)
    out = torch.empty(tokens * top_k, w2.shape[1], dtype=torch.float32, device=x.device)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # host sync: CPU path only
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        rows = slots // top_k
        h = matmul(x.index_select(0, rows), w13[expert])
        inter = h.shape[-1] // 2
        h = F.silu(h[:, :inter]) * h[:, inter:]
        y = matmul(h, w2[expert]).float() * weights.flatten()[slots, None]
        out[slots] = y
    return out.view(tokens, top_k, -1).sum(1).to(x.dtype)
