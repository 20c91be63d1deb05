"""The memory planner: weights, K/V bytes per token (and a hybrid's fixed recurrent state per
sequence), and the largest batch x context that fits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tuili.analysis import mamba
from tuili.analysis import ops as opsmod
from tuili.models.config import ModelConfig

CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass
class MemoryPlan:
    """What fits on one device: bytes of weights and K/V, and batches per context length."""
    device_bytes: float
    utilization: float
    weight_bytes: float
    activation_reserve_bytes: float
    kv_bytes_per_token: float
    kv_budget_bytes: float
    max_kv_tokens: int
    max_batch_by_context: dict[int, int]
    state_bytes_per_seq: float = 0.0  # a hybrid's mixer states, whatever the context

    def max_batch(self, context: int) -> int:
        """Sequences of `context` tokens that fit: their K/V and their states."""
        if not self.state_bytes_per_seq:
            return self.max_kv_tokens // context
        return int(self.kv_budget_bytes // (self.kv_bytes_per_token * context
                                            + self.state_bytes_per_seq))

    def as_dict(self) -> dict:
        return asdict(self)


def kv_bytes_per_token(c: ModelConfig, kv_format: str = "bf16") -> float:
    """K and V of every attention layer for one token."""
    return 2 * c.num_attention_layers * c.num_kv_heads * c.head_dim * opsmod.weight_bytes_per_param(kv_format)


def kv_bytes_read(c: ModelConfig, context: int, kv_format: str = "bf16") -> float:
    """K and V one sequence's decode step reads at `context` tokens: a sliding layer's window only
    (the blocks before it stay allocated: the layers share one block table)."""
    per_key = 2 * c.num_kv_heads * c.head_dim * opsmod.weight_bytes_per_param(kv_format)
    return sum(min(context, w) if w else context for w in mamba.attention_windows(c)) * per_key


def activation_reserve(c: ModelConfig, max_batched_tokens: int, act_bytes: int,
                       max_seqs: int = 256) -> float:
    """A working-set estimate for the largest step: a few hidden-sized and one MLP-sized buffer
    per token, and fp32 logits for each sampled row."""
    per_token = (4 * c.hidden_size + 2 * c.intermediate_size) * act_bytes
    return max_batched_tokens * per_token + max_seqs * c.vocab_size * 4


def plan(c: ModelConfig, precision: opsmod.Precision, device_bytes: float, utilization: float = 0.9,
         max_batched_tokens: int = 2048) -> MemoryPlan:
    """Weights first, an activation reserve, the rest for K/V (and a hybrid's states, a fixed
    amount per sequence, kept in the K/V format)."""
    weights = opsmod.weight_bytes(c, precision)
    reserve = activation_reserve(c, max_batched_tokens, opsmod.DTYPE_BYTES[precision.activations])
    per_token = kv_bytes_per_token(c, precision.kv)
    budget = max(device_bytes * utilization - weights - reserve, 0.0)
    state = mamba.state_bytes_per_seq(c, opsmod.weight_bytes_per_param(precision.kv))
    tokens = int(budget // per_token) if per_token else 0
    contexts = [n for n in CONTEXTS if n <= c.max_position_embeddings]
    if c.max_position_embeddings not in contexts:
        contexts.append(c.max_position_embeddings)
    result = MemoryPlan(device_bytes, utilization, weights, reserve, per_token, budget, tokens,
                        {}, state)
    result.max_batch_by_context = {n: result.max_batch(n) for n in contexts}
    return result
