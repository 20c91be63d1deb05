"""Mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE (shared expert) and Mixtral.

Attention and the decoder layer are llama.py's; a sparse layer's MLP is a MoEBlock: a router
(top-k of a softmax), the experts' weights stacked for the fused kernel, and (Qwen2-MoE) a shared
expert scaled by a sigmoid gate. Checkpoints name each expert's projections apart
(`experts.3.gate_proj`, Mixtral's `experts.3.w1`); they load into the stacked weights.
"""

from __future__ import annotations

import torch
from torch import nn

from tuili.kernels import reference_moe, triton_module
from tuili.layers.backend import TORCH, Backend
from tuili.layers.linear import Linear
from tuili.layers.norm import RMSNorm
from tuili.models.config import ModelConfig
from tuili.models.llama import LlamaForCausalLM
from tuili.models.moe_config import MoEConfig

# Mixtral's expert names -> Qwen's
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Experts(nn.Module):
    """The experts' SiLU-gated MLPs, stacked: w13 [experts, 2 * inter, hidden] (each expert's gate
    rows, then its up rows) and w2 [experts, hidden, inter]."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.w13.weight_loader, self.w13.num_parts = self._load_w13, 2 * num_experts
        self.w2.weight_loader, self.w2.num_parts = self._load_w2, num_experts

    def _load_w13(self, param: nn.Parameter, tensor: torch.Tensor, part: int) -> None:
        """Part 2e is expert e's gate_proj, part 2e + 1 its up_proj."""
        expert, half = divmod(part, 2)
        rows = param.data[expert, half * self.inter:(half + 1) * self.inter]
        _copy(rows, tensor)

    def _load_w2(self, param: nn.Parameter, tensor: torch.Tensor, part: int) -> None:
        _copy(param.data[part], tensor)


def _copy(dest: torch.Tensor, tensor: torch.Tensor) -> None:
    if dest.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(tensor)


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert that every token passes through."""

    def __init__(self, hidden: int, inter: int, backend: Backend):
        super().__init__()
        self.backend = backend
        self.gate_up_proj = Linear(hidden, [inter, inter])
        self.down_proj = Linear(inter, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(self.backend.linear(h, self.gate_up_proj, gated=True),
                                   self.down_proj)


class MoEBlock(nn.Module):
    """A sparse layer's MLP: stream + sum over the top-k experts of weight * expert(norm(stream))
    (+ the shared expert's output, gated)."""

    def __init__(self, c: ModelConfig, backend: Backend):
        super().__init__()
        m: MoEConfig = c.moe
        self.top_k, self.renormalize, self.backend = m.top_k, m.renormalize, backend
        self.gate = Linear(c.hidden_size, m.num_experts)  # the router
        self.experts = Experts(m.num_experts, c.hidden_size, m.expert_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if m.shared_intermediate_size:
            self.shared_expert = SharedExpert(c.hidden_size, m.shared_intermediate_size, backend)
            self.shared_expert_gate = Linear(c.hidden_size, 1)
        # The device path, chosen once: the Triton grouped GEMM on the GPU, the reference on CPU.
        self._fused_moe = (triton_module("triton_moe").fused_moe if backend.name == "triton"
                           else reference_moe.fused_moe)

    def forward(self, stream, norm: RMSNorm):
        h, stream = stream.normed(norm)
        return stream.plus(self.mix(h))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """The block's output for normed hidden states h [tokens, hidden]."""
        weights, ids = reference_moe.route(self.backend.linear(h, self.gate), self.top_k,
                                           self.renormalize)
        out = self._fused_moe(h, self.experts.w13, self.experts.w2, weights, ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.backend.linear(h, self.shared_expert_gate))
            out = out + gate * self.shared_expert(h)
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Llama's decoder with MoEBlocks in its sparse layers."""

    supports_tensor_parallel = False  # the experts are not sharded yet

    @staticmethod
    def config_from_hf(cfg: dict) -> ModelConfig:
        arch = cfg["architectures"][0]
        # transformers 5 writes Qwen's num_experts as num_local_experts, Mixtral's name
        experts = cfg.get("num_local_experts") or cfg["num_experts"]
        if arch == "MixtralForCausalLM":
            moe = MoEConfig(num_experts=experts, top_k=cfg["num_experts_per_tok"],
                            expert_intermediate_size=cfg["intermediate_size"], renormalize=True)
        else:  # Qwen2-MoE, Qwen3-MoE
            moe = MoEConfig(
                num_experts=experts, top_k=cfg["num_experts_per_tok"],
                expert_intermediate_size=cfg["moe_intermediate_size"],
                renormalize=cfg.get("norm_topk_prob", arch == "Qwen3MoeForCausalLM"),
                shared_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
                sparse_step=cfg.get("decoder_sparse_step") or 1,
                dense_layers=list(cfg.get("mlp_only_layers") or []))
        return ModelConfig.from_hf(
            cfg, attention_bias=cfg.get("attention_bias", arch == "Qwen2MoeForCausalLM"),
            qk_norm=arch == "Qwen3MoeForCausalLM", moe=moe)

    def make_mlp(self, c: ModelConfig, layer: int, backend: Backend = TORCH) -> nn.Module | None:
        return MoEBlock(c, backend) if c.moe.is_sparse(layer) else None

    def checkpoint_target(self, name: str) -> tuple[str, int | None]:
        """Per-expert tensors (layers.L.mlp.experts.E.gate_proj.weight, Mixtral's
        block_sparse_moe.experts.E.w1.weight) -> a part of the stacked w13 or w2; already stacked
        ones (transformers 5's experts.gate_up_proj) fill it whole."""
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
        if "experts" not in parts:
            return super().checkpoint_target(".".join(parts))
        at = parts.index("experts")
        owner = ".".join(parts[:at + 1])
        rest = parts[at + 1:]
        if rest[0].isdigit():  # one expert's projection: [E, proj, "weight"]
            expert, proj = int(rest[0]), _MIXTRAL_EXPERT.get(rest[1], rest[1])
            if proj == "down_proj":
                return f"{owner}.w2", expert
            return f"{owner}.w13", 2 * expert + (proj == "up_proj")
        stacked = {"gate_up_proj": "w13", "down_proj": "w2"}
        return f"{owner}.{stacked.get(rest[0], rest[0])}", None
