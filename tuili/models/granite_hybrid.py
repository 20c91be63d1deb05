"""IBM Granite 4.0-H (GraniteMoeHybridForCausalLM): Mamba-2 mixer layers interleaved with
attention layers as `layer_types` says, each layer followed by a dense shared MLP and, where the
config has experts, a top-k mixture of experts beside it; granite's multipliers scale the
embedding, each residual branch, the attention scores and (dividing) the logits.

Why Granite 4.0-H over Bamba: the same Mamba-2 SSD mixer (Falcon-H1, Bamba and Nemotron-H share
it), but granite's attention layers need no rotary ("nope") and its configs come dense or with
experts, so one family covers the published granite-4.0-h-micro/tiny/small checkpoints, and its
experts reuse models/moe.py's MoEBlock and fused kernel. The recurrent states are the engine's
(layers/mamba2.py, engine/state_cache.py); attention runs through the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from tuili.errors import ModelLoadError
from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.backend import TORCH, Backend
from tuili.layers.embedding import Embedding
from tuili.layers.linear import Linear
from tuili.layers.mamba2 import Mamba2Mixer
from tuili.layers.norm import RMSNorm
from tuili.models.config import ModelConfig
from tuili.models.llama import LlamaForCausalLM
from tuili.models.mamba_config import MambaConfig
from tuili.models.moe import MoEBlock
from tuili.models.moe_config import MoEConfig

MIXER_TYPES = ("mamba", "linear_attention")
ATTENTION_TYPES = ("attention", "full_attention")
# Older (original) checkpoint names of the experts and router -> transformers 5's.
_RENAMES = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.w13",
            "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.w2",
            "block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.experts.w13",
            "block_sparse_moe.experts.down_proj": "block_sparse_moe.experts.w2",
            "block_sparse_moe.router.layer.weight": "block_sparse_moe.gate.weight",
            "block_sparse_moe.router.weight": "block_sparse_moe.gate.weight"}


def mamba_config(cfg: dict) -> MambaConfig:
    """The mixer layers and their shape from a granitemoehybrid config.json."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * n
    unknown = sorted(set(types) - set(MIXER_TYPES) - set(ATTENTION_TYPES))
    if len(types) != n or unknown:
        raise ModelLoadError(f"layer_types must name each of the {n} layers one of "
                             f"{MIXER_TYPES + ATTENTION_TYPES}; got {types}")
    heads = cfg.get("mamba_n_heads", 128)
    inter = int(cfg.get("mamba_expand", 2) * cfg["hidden_size"])
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = inter // heads if head_dim in (None, "auto") else head_dim
    if head_dim * heads != inter:
        raise ModelLoadError(f"mamba_d_head {head_dim} x mamba_n_heads {heads} != mamba_expand x "
                             f"hidden_size = {inter}")
    limit = cfg.get("time_step_limit") or (0.0, float("inf"))
    return MambaConfig(
        layers=[i for i, t in enumerate(types) if t in MIXER_TYPES], num_heads=heads,
        head_dim=head_dim, state_size=cfg.get("mamba_d_state", 256),
        n_groups=cfg.get("mamba_n_groups", 1), conv_kernel=cfg.get("mamba_d_conv", 4),
        chunk_size=cfg.get("mamba_chunk_size", 256), conv_bias=cfg.get("mamba_conv_bias", True),
        proj_bias=cfg.get("mamba_proj_bias", False), dt_min=_float(limit[0]),
        dt_max=_float(limit[1]))


def _float(v) -> float:
    """A config number; transformers 5 writes infinity as {"__float__": "Infinity"}."""
    return float(v["__float__"] if isinstance(v, dict) else v)


class GraniteAttention(nn.Module):
    def __init__(self, c: ModelConfig, backend: Backend):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, [self.nh * self.d, self.nkv * self.d,
                                               self.nkv * self.d], bias=c.attention_bias)
        self.o_proj = Linear(self.nh * self.d, c.hidden_size, bias=c.attention_bias)
        self.attn = Attention(self.nh, self.nkv, self.d, backend.attention,
                              scale=c.hf.get("attention_multiplier", 1.0),
                              rotary=c.hf.get("position_embedding_type") == "rope")


class GraniteHybridLayer(nn.Module):
    """A mixer or attention layer, then the shared MLP (+ the experts), each branch scaled by
    residual_multiplier before it joins the residual."""

    def __init__(self, c: ModelConfig, layer: int, backend: Backend):
        super().__init__()
        self.backend = backend
        self.residual_multiplier = c.hf.get("residual_multiplier", 1.0)
        self.mamba = self.self_attn = None
        if layer in c.mamba.layers:
            self.mamba = Mamba2Mixer(c.mamba, c.hidden_size, c.rms_norm_eps, backend)
        else:
            self.self_attn = GraniteAttention(c, backend)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.shared_mlp = nn.Module()
        shared = c.hf["shared_intermediate_size"]
        self.shared_mlp.input_linear = Linear(c.hidden_size, 2 * shared)  # [gate | up]
        self.shared_mlp.output_linear = Linear(shared, c.hidden_size)
        # the experts beside the shared MLP (MoEBlock's own shared expert is not granite's)
        self.block_sparse_moe = MoEBlock(replace(c, moe=replace(c.moe, shared_intermediate_size=0)),
                                         backend) if c.moe else None

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, the layer's scaled output still to be added to it; the add rides in the
        next norm). Given `rows`, only those rows come out."""
        linear = self.backend.linear
        h, x = (self.input_layernorm(x), x) if delta is None else self.input_layernorm(delta, x)
        if self.mamba is not None:
            out = self.mamba(h, meta)
        else:
            a = self.self_attn
            qkv = linear(h, a.qkv_proj).view(h.shape[0], a.nh + 2 * a.nkv, a.d)
            out = a.attn(qkv, meta)
        if rows is not None:
            out, x = out.index_select(0, rows), x.index_select(0, rows)
        if self.self_attn is not None:
            out = linear(out, self.self_attn.o_proj)
        h, x = self.post_attention_layernorm(out * self.residual_multiplier, x)
        mlp = linear(linear(h, self.shared_mlp.input_linear, gated=True),
                     self.shared_mlp.output_linear)
        if self.block_sparse_moe is not None:
            mlp = mlp + self.block_sparse_moe.mix(h)
        return x, mlp * self.residual_multiplier


class GraniteHybridForCausalLM(nn.Module):
    MERGED = LlamaForCausalLM.MERGED

    @staticmethod
    def config_from_hf(cfg: dict) -> ModelConfig:
        """The shared MLP is the dense one (intermediate_size); the experts' own width is the
        config's intermediate_size."""
        experts = cfg.get("num_local_experts") or 0
        shared = cfg.get("shared_intermediate_size", 1024)
        moe = MoEConfig(num_experts=experts, top_k=cfg["num_experts_per_tok"],
                        expert_intermediate_size=cfg["intermediate_size"], renormalize=True,
                        shared_intermediate_size=shared) if experts else None
        kind = cfg.get("position_embedding_type")
        if kind not in (None, "nope", "rope"):
            raise ModelLoadError(f"position_embedding_type {kind!r} is not supported (rope, nope)")
        return ModelConfig.from_hf({**cfg, "intermediate_size": shared}, moe=moe,
                                   mamba=mamba_config(cfg))

    def __init__(self, c: ModelConfig, backend: Backend = TORCH):
        super().__init__()
        self.config, self.backend = c, backend
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.embedding_multiplier = c.hf.get("embedding_multiplier", 1.0)
        self.logits_scaling = c.hf.get("logits_scaling", 1.0)
        self.layers = nn.ModuleList(GraniteHybridLayer(c, i, backend) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.lm_head = Linear(c.hidden_size, c.vocab_size,
                              weight=self.embed_tokens.weight if c.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden stream [tokens, hidden] after the last layer (only `rows`' when given);
        `logits` applies the final norm."""
        x = self.embed_tokens(input_ids) * self.embedding_multiplier
        delta, last = None, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, meta, rows if i == last else None)
        return x + delta

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, the LM head, divided by logits_scaling."""
        return self.backend.linear(hidden, self.lm_head, norm=self.norm) / self.logits_scaling

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers if layer.self_attn is not None]

    def state_layers(self) -> list[Mamba2Mixer]:
        """The layers whose per-sequence recurrent state the runner binds (engine/state_cache.py)."""
        return [layer.mamba for layer in self.layers if layer.mamba is not None]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed():
            for name, tensor in weights:
                for old, new in _RENAMES.items():
                    if name.endswith(old):
                        name = name.removesuffix(old) + new
                yield name, tensor

        LlamaForCausalLM.load_weights(self, renamed())

    def checkpoint_target(self, name: str) -> tuple[str, int | None]:
        """Merged q/k/v as Llama's; the stacked experts (w13, w2) fill their parameter whole."""
        if name.endswith((".experts.w13", ".experts.w2")):
            return name, None
        return LlamaForCausalLM.checkpoint_target(self, name)
