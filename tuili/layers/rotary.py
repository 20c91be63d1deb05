"""Rotary position embedding (rotate-half form), with llama3 and linear frequency scaling."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tuili.errors import ModelLoadError
from tuili.kernels import reference


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv, scaling)
    if kind == "factors":  # GGUF rope_freqs tensor: per-frequency divisors
        return inv / scaling["factors"]
    raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Holds cos/sin for every position up to max_len; the runner indexes them once per step.
    `local`: the table of the layers marked local_rope (Gemma 3's sliding layers have their own
    base, unscaled), this one where no local_theta is given."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: torch.device, local_theta: float | None = None):
        inv = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)
        self.local = self if local_theta is None else RotaryEmbedding(
            head_dim, max_len, local_theta, None, dtype, device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, 1, head_dim], ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_qk(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor | None,
              sin: torch.Tensor | None, q_norm: Callable | None = None, k_norm: Callable | None = None,
              folded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from the merged QKV output [tokens, heads + 2 * kv_heads, head_dim], q and k
    normalised per head (when norms are given, as in Qwen3) and rotated (cos None: not rotated).
    The torch path: on the GPU (power-of-two head dims) triton_rope does this and the KV store in
    one kernel. folded: `sin` is reference.fold_sin's (the same values out, fewer ops)."""
    nh, nkv = num_heads, num_kv_heads
    if cos is None:  # contiguous, as the kernels after this want their rows
        q, k, v = (t.contiguous() for t in qkv.split([nh, nkv, qkv.shape[1] - nh - nkv], dim=1))
        return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k)), v
    rotate = reference.apply_rotary_folded if folded else reference.apply_rotary
    if q_norm is None:
        # q and k sit side by side in the merged output: rotate both in one pass.
        qk = rotate(qkv[:, : nh + nkv], cos, sin)
        q, k = qk.split([nh, nkv], dim=1)
    else:
        q = rotate(q_norm(qkv[:, :nh]), cos, sin)
        k = rotate(k_norm(qkv[:, nh: nh + nkv]), cos, sin)
    return q, k, qkv[:, nh + nkv:]
