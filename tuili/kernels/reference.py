"""Plain-torch paged attention and KV-cache store: the CPU path and the GPU kernels' oracle.

Cache layout, per layer: k_cache and v_cache of shape [num_blocks, block_size, kv_heads, head_dim].
Token t of a sequence lives in block block_table[t // block_size], row t % block_size; the flat
slot of that row is block_id * block_size + t % block_size.

An FP8 cache (float8_e4m3fn) comes with scales [kv_heads] per layer for K and for V: a store
writes x / scale clamped to the format's +-448, and every read gives back cached * scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [tokens, kv_heads, d] / scale [kv_heads], clamped to +-FP8_MAX, in the cache's dtype."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                  head_dim: int = -2) -> torch.Tensor:
    """Cached rows back in `dtype`: x * scale along the kv-head dimension (x as is, no scale)."""
    if scale is None:
        return x
    shape = [1] * x.dim()
    shape[head_dim] = scale.numel()
    return (x.float() * scale.view(shape)).to(dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write k, v ([tokens, kv_heads, head_dim]) into their cache slots (quantized with scales)."""
    kvh, d = k.shape[1], k.shape[2]
    if k_scale is not None:  # CPU torch has no index_copy_ of float8: copy the bytes
        k = quantize_kv(k, k_scale, k_cache.dtype).view(torch.uint8)
        v = quantize_kv(v, v_scale, v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int,
              start: int = 0) -> torch.Tensor:
    """One sequence's cached rows start .. length as [length - start, kv_heads, head_dim]; the
    blocks wholly before `start` are not read."""
    bs = cache.shape[1]
    first = start // bs
    blocks = cache.index_select(0, block_table[first: (length + bs - 1) // bs])
    return blocks.flatten(0, 1)[start - first * bs: length - first * bs]


# Up to so many keys, a step's one decode attends in two float32 matmuls (single_decode):
# SDPA's CPU flash kernel costs 63 us for one query over 80 keys (SmolLM2's heads) where the
# matmuls take 20, 838 against 114 at 1,024 keys, and draws level near 4,096 (one thread).
SINGLE_DECODE_MAX_LEN = 4096


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                     scale: float, window: int = 0, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q: [B, heads, d] -> [B, heads, d]. A window > 0 keeps each
    sequence's last `window` keys (its newest token's included)."""
    B, bs = q.shape[0], k_cache.shape[1]
    nblocks = (max_len + bs - 1) // bs
    table = block_tables[:, :nblocks]
    k = k_cache[table].flatten(1, 2)[:, :max_len].transpose(1, 2)  # [B, kvh, L, d]
    v = v_cache[table].flatten(1, 2)[:, :max_len].transpose(1, 2)
    k, v = dequantize_kv(k, k_scale, q.dtype, 1), dequantize_kv(v, v_scale, q.dtype, 1)
    mask = None
    if B > 1 or 0 < window < max_len:
        pos = torch.arange(max_len, device=q.device)[None, :]
        mask = pos < seq_lens[:, None]
        if window > 0:
            mask &= pos >= seq_lens[:, None] - window
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def single_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, scale: float) -> torch.Tensor:
    """One query q [heads, d] over the keys and values at `slots` of a 16-bit cache -> [heads, d]:
    softmax(q k^T * scale) v in float32, each KV head serving its group of query heads."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.view(-1, kvh, d).index_select(0, slots).float()  # [L, kvh, d]
    v = v_cache.view(-1, kvh, d).index_select(0, slots).float()
    scores = torch.bmm(q.view(kvh, -1, d).float(), k.permute(1, 2, 0)).mul_(scale)
    out = torch.bmm(torch.softmax(scores, -1), v.transpose(0, 1))  # [kvh, heads / kvh, d]
    return out.view(q.shape).to(q.dtype)


def cache_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The flat cache slots of one sequence's first `length` tokens [length]."""
    blocks = block_table[: (length + block_size - 1) // block_size]
    offsets = torch.arange(block_size, device=block_table.device)
    return (blocks[:, None] * block_size + offsets).flatten()[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                      scale: float, window: int = 0, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for one sequence's new tokens q/k/v ([n, heads, d]) that follow
    `context_len` tokens already in the cache; a window > 0 lets each query see only its last
    `window` keys. Returns [n, heads, d]. With scales (an FP8 cache, this step's K/V already
    stored) every key is read from the cache, as the Triton kernel reads them."""
    n = q.shape[0]
    total = context_len + n
    # The first key any query sees: the cached keys before it are not read.
    first = max(context_len - window + 1, 0) if window > 0 else 0
    if context_len == 0 and k_scale is None and not 0 < window < n:
        keys, values, causal, mask = k, v, True, None
    else:
        if context_len == 0 and k_scale is None:
            keys, values = k, v
        else:
            keys = dequantize_kv(gather_kv(k_cache, block_table, total, first), k_scale, q.dtype)
            values = dequantize_kv(gather_kv(v_cache, block_table, total, first), v_scale, q.dtype)
        # Query i sits at position context_len + i and sees keys up to it (and within the window).
        q_pos = torch.arange(context_len, total, device=q.device)[:, None]
        k_pos = torch.arange(total - keys.shape[0], total, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window > 0:
            mask &= k_pos > q_pos - window
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as HF: normalise in float32, cast back, then scale.
    dtype = x.dtype
    h = x.float()
    scale = (h * h).mean(-1, keepdim=True).add_(eps).rsqrt_()  # h * h: pow(2)'s bits, one op
    h = h * scale if h is x else h.mul_(scale)  # in place on a copy only
    return weight * h.to(dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a merged [gate | up] projection."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x: [tokens, heads, head_dim], cos/sin: [tokens, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fold_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: what apply_rotary_folded takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary_folded(x: torch.Tensor, cos: torch.Tensor, folded_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary's values bit for bit, in fewer ops (the CPU path's): rotate_half(x) * sin
    is roll(x, half) * fold_sin(sin), a negation moved from x to sin (done once per step)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * folded_sin


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Structured output's mask, in place: logits [rows, V] -inf where bitmask [rows,
    >= ceil(V / 32)] int32 has bit t % 32 of word t // 32 clear (triton_bitmask's oracle)."""
    rows, vocab = logits.shape
    if bitmask.shape[0] != rows or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask {tuple(bitmask.shape)} does not cover logits "
                         f"{tuple(logits.shape)}")
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(rows, -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))
