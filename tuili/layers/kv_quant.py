"""The FP8 KV cache's scales: the cache dtype an option names, the per-layer, per-KV-head K and V
scales read from a checkpoint (vLLM / llm-compressor layouts) or calibrated from a short prefill,
and their binding to the attention layers. The quantizing stores and dequantizing reads are the
kernels' (kernels/reference.py, triton_attention.py, triton_rope.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from tuili.distributed.group import SINGLE, TensorParallel
from tuili.kernels.reference import FP8_MAX
from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.parallel import qkv_shards
from tuili.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:  # models/ is the floor above: its config is only passed through here
    from tuili.models.config import ModelConfig

log = logging.getLogger("tuili")

FP8 = torch.float8_e4m3fn
# Calibrated scales leave this much headroom over the prefill's largest |K| and |V| per head:
# later tokens may reach further, and e4m3's floating exponent makes the headroom cheap (only
# values below 2^-6 of the scaled range lose mantissa bits), while a clamp is a real error.
CALIBRATION_MARGIN = 4.0
CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1879, the physicist wrote a letter to his "
    "colleague describing the results: 3.14159, 2.71828 and 1.41421. def main():\n    return "
    "sum(x * x for x in range(10))\nQuestion: What is the capital of France? Answer: Paris. "
    "Les sanglots longs des violons de l'automne blessent mon coeur d'une langueur monotone.")

# Checkpoint names of the scales, per attention layer: vLLM's and llm-compressor's
# self_attn.k_scale / v_scale, their older k_proj / v_proj output_scale, and one kv_scale for both.
_SCALE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|"
    r"v_proj\.output_scale)$")
_WHICH = {"k_scale": "k", "k_proj.output_scale": "k", "v_scale": "v",
          "v_proj.output_scale": "v", "kv_scale": "kv"}


def cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for a kv_cache_dtype option (EngineConfig validated it)."""
    return FP8 if name in ("fp8", "fp8_e4m3") else model_dtype


def split_scales(weights: Iterable[tuple[str, torch.Tensor]],
                 found: dict[tuple[int, str], torch.Tensor]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors less its KV-cache scales, which go to found[(layer, "k"|"v")]
    as they pass (float32, on CPU)."""
    for name, tensor in weights:
        match = _SCALE_NAME.search(name)
        if match is None:
            yield name, tensor
            continue
        tensor = tensor.materialize() if hasattr(tensor, "materialize") else tensor
        value = tensor.detach().float().cpu().reshape(-1)
        layer, which = int(match.group(1)), _WHICH[match.group(2)]
        for part in ("k", "v") if which == "kv" else (which,):
            found[(layer, part)] = value


def kv_heads(config: ModelConfig, tp: TensorParallel) -> tuple[int, int] | None:
    """(the first of this rank's KV heads, the model's KV heads): a rank holds its share of
    them, or, with fewer KV heads than ranks, one of them replicated (layers/parallel.py).
    None on one rank: each layer holds all of its own."""
    if tp.size == 1:
        return None
    first = qkv_shards(config.num_heads, config.num_kv_heads, config.head_dim, tp)[1][0]
    return first // config.head_dim, config.num_kv_heads


def checkpoint_scales(layers: list[Attention], found: dict[tuple[int, str], torch.Tensor],
                      device: torch.device, heads: tuple[int, int] | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (k_scale, v_scale) [kv_heads] from the checkpoint's scales (one per tensor,
    broadcast, or one per KV head: this rank's, heads = kv_heads(...)); None when the
    checkpoint has none."""
    if not found:
        return None
    scales = []
    for i, attn in enumerate(layers):
        first, total = heads or (0, attn.num_kv_heads)
        pair = []
        for part in ("k", "v"):
            value = found.get((i, part))
            if value is None:
                raise ValueError(f"the checkpoint has KV-cache scales but none for layer {i}'s "
                                 f"{part}_scale; give every layer both, or none")
            if value.numel() not in (1, total):
                raise ValueError(f"layer {i}'s {part}_scale has {value.numel()} values; expected "
                                 f"1 or one per KV head ({total})")
            if not torch.all(value > 0):
                raise ValueError(f"layer {i}'s {part}_scale must be > 0, got {value.tolist()}")
            if value.numel() > 1:
                value = value[first:first + attn.num_kv_heads]
            pair.append(value.expand(attn.num_kv_heads).contiguous().to(device))
        scales.append(tuple(pair))
    return scales


def agree(scales: list[tuple[torch.Tensor, torch.Tensor]], heads: tuple[int, int] | None,
          tp: TensorParallel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibrated scales made one set over the ranks: each KV head's the largest any rank
    measured (ranks holding a replicated head hold one scale for it), each rank its heads'."""
    if tp.size == 1:
        return scales
    first, total = heads
    n = scales[0][0].numel()
    full = torch.zeros(len(scales), 2, total, device=scales[0][0].device)
    full[:, :, first:first + n] = torch.stack([torch.stack(pair) for pair in scales])
    mine = tp.all_max(full)[:, :, first:first + n]
    return [(k.clone(), v.clone()) for k, v in mine]


@torch.inference_mode()
def calibrate(model: torch.nn.Module, config: ModelConfig, token_ids: list[int], dtype: torch.dtype,
              device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (k_scale, v_scale) [kv_heads]: CALIBRATION_MARGIN x the largest |K| and |V|
    of each KV head over one prefill of token_ids (into 16-bit stand-in caches) / 448."""
    layers = model.attention_layers()
    n = len(token_ids)
    for attn in layers:
        shape = (n, 1, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.k_scale = attn.v_scale = None
    rope = RotaryEmbedding(config.head_dim, n, config.rope_theta, config.rope_scaling, dtype,
                           device, config.rope_local_theta)
    model(torch.tensor(token_ids, device=device), AttentionMetadata.one_prefill(n, rope, device))
    scales = []
    for attn in layers:
        pair = tuple((cache.float().abs().amax((0, 1, 3)) * (CALIBRATION_MARGIN / FP8_MAX))
                     .clamp_min(1e-8) for cache in (attn.k_cache, attn.v_cache))
        scales.append(pair)
        attn.k_cache = attn.v_cache = None
    return scales


def calibration_tokens(encode, vocab_size: int, count: int = 128) -> list[int]:
    """About `count` tokens of CALIBRATION_TEXT (repeated), or seeded random ids where the
    tokenizer gives too few."""
    ids = [t for t in encode(CALIBRATION_TEXT) if 0 <= t < vocab_size]
    if len(ids) < 16:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (count,), generator=g).tolist()
    return (ids * -(-count // len(ids)))[:count]


def bind(layers: list[Attention], scales: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for attn, (k, v) in zip(layers, scales, strict=True):
        attn.k_scale, attn.v_scale = k, v


def prepare_scales(model: torch.nn.Module, config: ModelConfig, found: dict[tuple[int, str], torch.Tensor],
                   encode, dtype: torch.dtype, device: torch.device, tp: TensorParallel = SINGLE
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's scales where it has them, else calibrated; a log line says which.
    Under tensor parallelism every rank calls it (calibration runs the model's collectives)
    and gets its KV heads' scales."""
    layers = model.attention_layers()
    heads = kv_heads(config, tp)
    scales = checkpoint_scales(layers, found, device, heads)
    if scales is not None:
        log.info("FP8 KV cache: k/v scales from the checkpoint (%d layers)", len(layers))
        return scales
    tokens = calibration_tokens(encode, config.vocab_size)
    scales = agree(calibrate(model, config, tokens, dtype, device), heads, tp)
    k_all = torch.cat([k for k, _ in scales])
    v_all = torch.cat([v for _, v in scales])
    log.info("FP8 KV cache: the checkpoint has no k/v scales; calibrated per layer and KV head "
             "from a %d-token prefill (amax x %.0f / 448; k scales %.3g..%.3g, v %.3g..%.3g)",
             len(tokens), CALIBRATION_MARGIN, k_all.min(), k_all.max(), v_all.min(), v_all.max())
    return scales
