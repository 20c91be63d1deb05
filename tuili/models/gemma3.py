"""Gemma 3 (text): sliding-window layers between global ones, q/k norms, GeGLU (tanh GELU), the
embedding scaled by sqrt(hidden), norms after attention and the MLP as well as before, and two rope
bases (the sliding layers' own). Gemma3ForConditionalGeneration loads its language model alone.

Gemma's RMSNorm scales by (1 + weight): the 1 is added as the weight loads, so every RMSNorm kernel
(the fused ones on the GPU included) serves it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tuili.errors import ModelLoadError
from tuili.layers.attention import Attention, AttentionMetadata
from tuili.layers.backend import TORCH, Backend
from tuili.layers.embedding import Embedding
from tuili.layers.linear import Linear
from tuili.layers.norm import RMSNorm
from tuili.models.config import ModelConfig, architecture
from tuili.models.llama import LlamaForCausalLM

# Gemma3TextConfig's defaults (transformers): multimodal checkpoints' text_config omits many.
TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 131_072, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "bos_token_id": 2, "eos_token_id": 1,
}
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0
# Where the language model's tensors sit in a multimodal checkpoint (old and new layouts).
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


def gemma_norm(size: int, eps: float, backend: Backend) -> RMSNorm:
    """An RMSNorm holding Gemma's 1 + weight (added as the checkpoint's weight loads)."""
    norm = RMSNorm(size, eps, backend)
    norm.weight.weight_loader = _load_plus_one
    return norm


def _load_plus_one(param: nn.Parameter, tensor: torch.Tensor, part: int = 0) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(1.0 + tensor.float())  # in float32, as HF computes it


def layer_windows(cfg: dict) -> list[int]:
    """Each layer's sliding window (0: global), from layer_types or the older sliding_window_pattern
    (every pattern-th layer global)."""
    n, window = cfg["num_hidden_layers"], cfg.get("sliding_window") or 0
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return [window if t == "sliding_attention" else 0 for t in types]


def _rope(cfg: dict) -> tuple[float, dict | None, float]:
    """(global base, global scaling, local base): transformers 5's rope_parameters per layer type,
    or the older rope_theta / rope_scaling / rope_local_base_freq."""
    params = cfg.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    local = params.get("sliding_attention") or {}
    if cfg.get("rope_scaling"):
        full.update(cfg["rope_scaling"])
    theta = float(full.get("rope_theta") or cfg.get("rope_theta") or GLOBAL_THETA)
    local_theta = float(local.get("rope_theta") or cfg.get("rope_local_base_freq") or LOCAL_THETA)
    kind = full.get("rope_type") or full.get("type") or "default"
    scaling = None if kind == "default" else {**full, "rope_type": kind}
    return theta, scaling, local_theta


class Gemma3Attention(nn.Module):
    def __init__(self, c: ModelConfig, backend: Backend, window: int):
        super().__init__()
        self.nh, self.nkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, [self.nh * self.d, self.nkv * self.d, self.nkv * self.d],
                               bias=c.attention_bias)
        self.o_proj = Linear(self.nh * self.d, c.hidden_size, bias=c.attention_bias)
        self.q_norm = gemma_norm(self.d, c.rms_norm_eps, backend)
        self.k_norm = gemma_norm(self.d, c.rms_norm_eps, backend)
        scale = c.hf.get("query_pre_attn_scalar", TEXT_DEFAULTS["query_pre_attn_scalar"]) ** -0.5
        self.attn = Attention(self.nh, self.nkv, self.d, backend.attention, scale=scale,
                              window=window, local_rope=window > 0)


class Gemma3MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(c.hidden_size, [c.intermediate_size, c.intermediate_size])
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, backend: Backend, window: int):
        super().__init__()
        self.backend = backend
        self.self_attn = Gemma3Attention(c, backend, window)
        self.mlp = Gemma3MLP(c)
        names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
        for name in names:
            setattr(self, name, gemma_norm(c.hidden_size, c.rms_norm_eps, backend))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual, the layer's output still to be added to it): the add is deferred into the
        next norm (the fused add + RMSNorm kernel). Given `rows`, only those rows come out."""
        attn, mlp, linear = self.self_attn, self.mlp, self.backend.linear
        h, x = (self.input_layernorm(x), x) if delta is None else self.input_layernorm(delta, x)
        qkv = linear(h, attn.qkv_proj).view(h.shape[0], attn.nh + 2 * attn.nkv, attn.d)
        out = attn.attn(qkv, meta, attn.q_norm, attn.k_norm)
        if rows is not None:
            out, x = out.index_select(0, rows), x.index_select(0, rows)
        h = self.post_attention_layernorm(linear(out, attn.o_proj))
        h, x = self.pre_feedforward_layernorm(h, x)
        gate, up = linear(h, mlp.gate_up_proj).chunk(2, dim=-1)
        h = linear(F.gelu(gate, approximate="tanh") * up, mlp.down_proj)
        return x, self.post_feedforward_layernorm(h)


class Gemma3ForCausalLM(nn.Module):
    MERGED = LlamaForCausalLM.MERGED
    checkpoint_target = LlamaForCausalLM.checkpoint_target

    @staticmethod
    def config_from_hf(cfg: dict) -> ModelConfig:
        """Gemma3ForCausalLM's config, or the text_config of Gemma3ForConditionalGeneration's."""
        text = {**TEXT_DEFAULTS, **cfg.get("text_config", cfg), "architectures": [architecture(cfg)]}
        if text.get("attn_logit_softcapping"):
            raise ModelLoadError("attn_logit_softcapping (Gemma 2's) is not supported")
        theta, scaling, local_theta = _rope(text)
        text["rope_parameters"] = text["rope_scaling"] = None  # read here, not by ModelConfig
        return ModelConfig.from_hf(text, qk_norm=True, rope_theta=theta, rope_scaling=scaling,
                                   layer_windows=layer_windows(text), rope_local_theta=local_theta)

    def __init__(self, c: ModelConfig, backend: Backend = TORCH):
        super().__init__()
        self.config, self.backend = c, backend
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.embed_scale = c.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(c, backend, w) for w in c.windows())
        self.norm = gemma_norm(c.hidden_size, c.rms_norm_eps, backend)
        self.lm_head = Linear(c.hidden_size, c.vocab_size,
                              weight=self.embed_tokens.weight if c.tie_word_embeddings else None)
        self.softcap = c.hf.get("final_logit_softcapping")

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden stream [tokens, hidden] after the last layer (only `rows`' when given);
        `logits` applies the final norm."""
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype).item()  # rounded to the dtype, as HF
        delta, last = None, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, meta, rows if i == last else None)
        return x + delta

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, the LM head, and the final logit softcapping where the config sets it."""
        logits = self.backend.linear(hidden, self.lm_head, norm=self.norm)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors; a multimodal checkpoint's language model alone (its vision tower and
        projector are skipped)."""
        def text_only():
            for name, tensor in weights:
                if name.startswith(VISION_PREFIXES):
                    continue
                for prefix in TEXT_PREFIXES:
                    if name.startswith(prefix):
                        name = "model." + name.removeprefix(prefix)
                        break
                yield name, tensor

        LlamaForCausalLM.load_weights(self, text_only())
