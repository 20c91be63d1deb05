"""Rotary position embedding (rotate-half form), with llama3 and linear frequency scaling."""

from __future__ import annotations

import math

import torch

from tuili.errors import ModelLoadError
from tuili.kernels import on_gpu, reference, triton_module


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
    """Holds cos/sin for every position up to max_len; the runner indexes them once per step."""

    def __init__(self, head_dim: int, max_len: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: torch.device):
        inv = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin = emb.sin().to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, 1, head_dim], ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    if on_gpu(x) and half & (half - 1) == 0:  # the kernel wants a power-of-two half
        return triton_module("triton_fused").apply_rotary(x, cos, sin)
    return reference.apply_rotary(x, cos, sin)
