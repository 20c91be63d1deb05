"""Plain-torch Mamba-2 kernels: the causal depthwise conv1d with a carried state, the chunked SSD
scan (state space duality) and its one-step decode update. The CPU path and triton_mamba's oracle.

Shapes, per token: x [heads, head_dim], dt [heads] (already softplus'ed and clamped), B and C
[groups, state] (head h reads group h // (heads / groups)); A [heads] is negative, D [heads] the
skip. The recurrence, per head: state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T (state
[head_dim, state]), y_t = state_t C_t + D x_t. States live in pools of slots, one slot per running
sequence (engine/state_cache.py); a prefill that starts a sequence (cached == 0) starts from zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's new tokens x [n, channels] through the causal conv (weight [channels, K]),
    then SiLU, the previous K - 1 inputs taken from `state` [channels, K - 1] (zeros if None).
    Returns (out [n, channels], the new state)."""
    channels, k = weight.shape
    if state is None:
        state = x.new_zeros(channels, k - 1)
    if x.shape[0] == 0:
        return x, state
    xs = torch.cat([state.to(x.dtype), x.t()], dim=1)  # [channels, K - 1 + n]
    out = F.conv1d(xs[None], weight[:, None, :], bias, groups=channels)[0]
    return F.silu(out).t(), xs[:, xs.shape[1] - (k - 1):]


def conv1d_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token per sequence: x [batch, channels], state [batch, channels, K - 1].
    Returns (out [batch, channels], the new states)."""
    xs = torch.cat([state.to(x.dtype), x[:, :, None]], dim=2)  # [batch, channels, K]
    out = (xs * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out), xs[:, :, 1:]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """B or C [..., groups, state] -> [..., heads, state], each group serving heads / groups."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, chunk_size: int,
             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's n tokens (x [n, heads, head_dim], dt [n, heads], B/C [n, groups, state])
    in chunks of chunk_size: within a chunk the outputs are a masked, decayed attention-like
    product (C_i . B_j), across chunks the state carries. `state` [heads, head_dim, state]: the
    initial state (zeros if None). Returns (y [n, heads, head_dim] float32, final state float32)."""
    n, heads, p = x.shape
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _heads(B.float(), heads), _heads(C.float(), heads)
    state = x.new_zeros(heads, p, B.shape[-1]) if state is None else state.float()
    y = torch.empty_like(x)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        xc, dtc, Bc, Cc = x[s:e], dt[s:e], B[s:e], C[s:e]
        cum = torch.cumsum(dtc * A, dim=0)  # [L, heads]: log decay from the chunk's start
        seg = cum[:, None, :] - cum[None, :, :]  # [i, j, heads]: log decay from j to i
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
        scores = torch.einsum("ihn,jhn->ijh", Cc, Bc) * decay * dtc[None, :, :]
        yc = torch.einsum("ijh,jhp->ihp", scores, xc)
        yc += torch.einsum("ihn,hpn->ihp", Cc, state) * torch.exp(cum)[:, :, None]
        y[s:e] = yc
        into_end = torch.exp(cum[-1:] - cum) * dtc  # [L, heads]: each token's weight at the end
        state = state * torch.exp(cum[-1])[:, None, None] + \
            torch.einsum("jh,jhp,jhn->hpn", into_end, xc, Bc)
    return y + D.float()[:, None] * x, state


def ssd_update(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor, state: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: x [batch, heads, head_dim], dt [batch, heads], B/C [batch, groups,
    state], state [batch, heads, head_dim, state]. Returns (y float32, the new states float32)."""
    heads = x.shape[1]
    x, dt = x.float(), dt.float()
    B, C = _heads(B.float(), heads), _heads(C.float(), heads)
    decay = torch.exp(dt * A.float())[:, :, None, None]
    state = state.float() * decay + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D.float()[:, None] * x
    return y, state


# ---- the mixer's entry points: a step's rows against the state pools --------------------------

def prefill_states(conv_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   conv_pool: torch.Tensor, slots: list[int], prefills: list[tuple[int, int, int]],
                   out: torch.Tensor) -> None:
    """The conv of each prefill sequence's rows (start, n, cached) of conv_x [tokens, channels]
    into out's rows, its carried state read from conv_pool[slot] (zeros when cached == 0) and
    written back."""
    for slot, (start, n, cached) in zip(slots, prefills):
        rows = slice(start, start + n)
        state = conv_pool[slot] if cached else None
        out[rows], new = conv1d(conv_x[rows], weight, bias, state)
        conv_pool[slot] = new.to(conv_pool.dtype)


def decode_states(conv_x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv_pool: torch.Tensor, slots: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The conv of one token per decode row (conv_x [decodes, channels]), states at `slots`;
    written into `out` when given."""
    result, new = conv1d_update(conv_x, weight, bias, conv_pool.index_select(0, slots))
    conv_pool.index_copy_(0, slots, new.to(conv_pool.dtype))
    if out is None:
        return result
    out.copy_(result)
    return out


def ssd_prefill(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: torch.Tensor, chunk_size: int, ssm_pool: torch.Tensor,
                slots: list[int], prefills: list[tuple[int, int, int]], y: torch.Tensor) -> None:
    """The chunked scan of each prefill sequence's rows into y (float32), from the state at its
    slot (zeros when cached == 0), the final state written back."""
    for slot, (start, n, cached) in zip(slots, prefills):
        rows = slice(start, start + n)
        y[rows], final = ssd_scan(x[rows], dt[rows], A, B[rows], C[rows], D, chunk_size,
                                  ssm_pool[slot] if cached else None)
        ssm_pool[slot] = final.to(ssm_pool.dtype)


def step_dt(dt: torch.Tensor, dt_bias: torch.Tensor,
            limits: tuple[float, float]) -> torch.Tensor:
    """The mixer's step sizes from the projection's dt: clamp(softplus(dt + dt_bias)), float32."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(*limits)


def ssd_decode(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor, ssm_pool: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
               dt_limits: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """The one-step update of each decode row at its slot; y float32 (into `out` when given).
    With dt_bias, dt is the projection's raw output and step_dt is taken of it here."""
    if dt_bias is not None:
        dt = step_dt(dt, dt_bias, dt_limits)
    y, new = ssd_update(x, dt, A, B, C, D, ssm_pool.index_select(0, slots))
    ssm_pool.index_copy_(0, slots, new.to(ssm_pool.dtype))
    if out is None:
        return y
    out.copy_(y)
    return out


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """rmsnorm(y * silu(z)) over groups of group_size channels (Mamba-2's n_groups), then the
    weight; in float32, the result in weight's dtype."""
    h = y.float() * F.silu(z.float())
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.view(h.shape).to(weight.dtype)
