"""MoEConfig: the experts of a mixture-of-experts decoder (Qwen3-MoE, Qwen2-MoE, Mixtral)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MoEConfig:
    num_experts: int
    top_k: int  # experts each token is routed to
    expert_intermediate_size: int
    renormalize: bool  # the top-k routing weights rescaled to sum to 1
    shared_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert (0: none)
    sparse_step: int = 1  # every sparse_step-th layer is sparse (Qwen's decoder_sparse_step)
    dense_layers: list[int] = field(default_factory=list)  # layers with a dense MLP instead

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k (num_experts_per_tok) is {self.top_k}, must be in "
                             f"[1, num_experts={self.num_experts}]")
