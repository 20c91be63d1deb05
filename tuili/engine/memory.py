"""KV-cache sizing: how many blocks the memory budget holds, and the longest sequence they allow."""

from __future__ import annotations

import logging

import torch

from tuili.config import EngineConfig
from tuili.distributed.group import SINGLE, TensorParallel
from tuili.engine.runner import profile_activation_bytes
from tuili.engine.state_cache import state_bytes_per_seq
from tuili.errors import InvalidParameter
from tuili.kernels import HAS_TRITON
from tuili.models.config import ModelConfig

log = logging.getLogger("tuili")
# At most this share of the cache budget goes to recurrent states; the rest holds K/V blocks.
STATE_SHARE = 0.5


def plan_kv_cache(c: EngineConfig, mc: ModelConfig, model: torch.nn.Module, dtype: torch.dtype,
                  device: torch.device, prefill_graph_tokens: int,
                  tp: TensorParallel = SINGLE, kv_dtype: torch.dtype | None = None,
                  reserved_bytes: float = 0) -> tuple[int, int]:
    """(KV-cache blocks, max_model_len) for this config, the cache in kv_dtype (default: dtype;
    FP8 takes one byte an element); errors say which option to change.
    Under tensor parallelism each rank sizes its own (its KV heads, its free memory) and all
    take the smallest count: the scheduler's block ids must exist on every rank.
    reserved_bytes: taken from the budget first (a hybrid model's recurrent states)."""
    layers = model.attention_layers()
    kv_dtype = kv_dtype or dtype
    element = torch.finfo(kv_dtype).bits // 8
    per_token = 2 * sum(a.num_kv_heads * a.head_dim for a in layers) * element
    per_block = c.block_size * (per_token or mc.kv_bytes_per_token(element))
    num_blocks = tp.min_over_ranks(c.num_kv_blocks or int(
        (_kv_budget_bytes(c, mc, model, dtype, device, prefill_graph_tokens) - reserved_bytes)
        // per_block))
    capacity = num_blocks * c.block_size
    if num_blocks < 1:
        raise InvalidParameter("kv_cache_memory_gb", f"the KV-cache budget holds no block of "
                               f"{per_block} bytes; raise kv_cache_memory_gb or "
                               "gpu_memory_utilization")
    if c.max_model_len is not None and c.max_model_len > capacity:
        raise InvalidParameter("max_model_len", f"{c.max_model_len} is more than the KV cache's "
                               f"{capacity} tokens; lower it or raise kv_cache_memory_gb")
    max_len = c.max_model_len or min(mc.max_position_embeddings, capacity)
    if not c.enable_chunked_prefill and c.max_num_batched_tokens < max_len:
        raise InvalidParameter("max_num_batched_tokens", f"{c.max_num_batched_tokens} < "
                               f"max_model_len={max_len}: without chunked prefill a whole prompt "
                               "must fit in one step")
    log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); max_model_len %d",
             num_blocks, c.block_size, capacity, num_blocks * per_block / 2**30,
             str(kv_dtype).removeprefix("torch."), max_len)
    return num_blocks, max_len


def plan_state_slots(c: EngineConfig, mc: ModelConfig, model: torch.nn.Module,
                     dtype: torch.dtype, device: torch.device, prefill_graph_tokens: int
                     ) -> tuple[int, int]:
    """(recurrent-state slots, bytes of one) for a hybrid model, (0, 0) for any other: a slot per
    running sequence, max_num_seqs of them, fewer where they would take more than STATE_SHARE of
    the cache budget (the engine then lowers max_num_seqs to the slots). With prefix caching a
    slot comes with a snapshot of its size (state_cache.StateSlots). With num_kv_blocks set, the
    states come on top of the blocks."""
    per_seq = state_bytes_per_seq(model, dtype) * (2 if c.enable_prefix_caching else 1)
    if not per_seq:
        return 0, 0
    slots = c.max_num_seqs
    if c.num_kv_blocks is None:
        budget = _kv_budget_bytes(c, mc, model, dtype, device, prefill_graph_tokens)
        slots = min(slots, int(budget * STATE_SHARE // per_seq))
    if slots < 1:
        raise InvalidParameter("kv_cache_memory_gb", f"one sequence's recurrent state takes "
                               f"{per_seq / 2**20:.1f} MiB, more than {STATE_SHARE:.0%} of the "
                               "cache budget; raise kv_cache_memory_gb or gpu_memory_utilization")
    log.info("recurrent states: %d slots x %.2f MiB = %.2f GiB (%d mixer layers, %s%s)", slots,
             per_seq / 2**20, slots * per_seq / 2**30, len(mc.mamba.layers) if mc.mamba else 0,
             str(dtype).removeprefix("torch."),
             ", each with a prefix-cache snapshot" if c.enable_prefix_caching else "")
    return slots, per_seq


def _kv_budget_bytes(c: EngineConfig, mc: ModelConfig, model: torch.nn.Module, dtype: torch.dtype,
                     device: torch.device, prefill_graph_tokens: int) -> float:
    if c.kv_cache_memory_gb is not None:
        return c.kv_cache_memory_gb * 2**30
    if device.type != "cuda" or not HAS_TRITON:
        return 2**30
    # What the utilization target leaves after everything in use now (our weights included)
    # and the activations of the largest step, measured by running one, and of the largest
    # prefill graph, whose memory pool is the graphs' own.
    peak = sum(profile_activation_bytes(model, mc, tokens, dtype, device)
               for tokens in (c.max_num_batched_tokens, prefill_graph_tokens) if tokens)
    free, total = torch.cuda.mem_get_info(device)
    budget = total * c.gpu_memory_utilization - (total - free) - peak
    log.info("GPU memory: %.1f GiB in use, %.2f GiB peak activations (steps of %d tokens, "
             "prefill graphs of %d), %.1f GiB left for the KV cache at utilization %.2f",
             (total - free) / 2**30, peak / 2**30, c.max_num_batched_tokens,
             prefill_graph_tokens, max(budget, 0) / 2**30,
             c.gpu_memory_utilization)
    return max(budget, 0)
