"""ModelConfig: the shape of a decoder model, read from an HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tuili.models.mamba_config import MambaConfig
from tuili.models.moe_config import MoEConfig


@dataclass
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    moe: MoEConfig | None = None  # the experts of a mixture-of-experts model (models/moe.py)
    mamba: MambaConfig | None = None  # a hybrid's Mamba-2 mixer layers (models/granite_hybrid.py)
    bos_token_id: int | None = None
    # Per layer: its sliding window in tokens, 0 where it attends to the whole context (empty: all).
    layer_windows: list[int] = field(default_factory=list)
    rope_local_theta: float | None = None  # the sliding layers' own rope base (Gemma 3)
    eos_token_ids: list[int] = field(default_factory=list)
    # the whole config.json, for what one family reads its own way (BERT: layer_norm_eps, ...)
    hf: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict, **family) -> ModelConfig:
        """The fields every decoder's HF config.json has; `family`: those a model family reads
        its own way (models/registry.config_from_hf asks the family's class)."""
        arch = architecture(cfg)
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        config = cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos if isinstance(eos, list) else ([eos] if eos is not None else []),
            hf=cfg,
        )
        return replace(config, **family) if family else config

    def to_hf(self) -> dict:
        """An HF config.json for this shape (used when exporting a GGUF model as an HF folder)."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[self.architecture]
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids
        cfg = {
            "architectures": [self.architecture], "model_type": model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "attention_bias": self.attention_bias, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = self.rope_scaling
        return cfg

    @property
    def num_attention_layers(self) -> int:
        """Layers that keep K/V (a hybrid's mixer layers keep a fixed state instead)."""
        return self.num_layers - (len(self.mamba.layers) if self.mamba else 0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_attention_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def windows(self) -> list[int]:
        """Each layer's sliding window, 0 for a layer that sees the whole context."""
        return self.layer_windows or [0] * self.num_layers


def architecture(cfg: dict) -> str:
    """The HF class name an HF config.json names ("?" if none)."""
    return (cfg.get("architectures") or ["?"])[0]


def _rope_theta(cfg: dict) -> float:
    # transformers 5 moved rope settings into "rope_parameters".
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    return {**scaling, "rope_type": kind}
