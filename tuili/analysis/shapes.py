"""A model's shape without its weights: built-in named shapes, a config.json, a GGUF file's
metadata, an HF folder, a loader alias, or a hub id (config.json only is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

from tuili.errors import ModelLoadError
from tuili.models.config import ModelConfig
from tuili.models.moe_config import MoEConfig


def _llama(hidden, inter, layers, heads, kv_heads, vocab, ctx, theta=10000.0, tied=False,
           head_dim=None, arch="LlamaForCausalLM") -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim or hidden // heads,
                       rope_theta=theta, max_position_embeddings=ctx, tie_word_embeddings=tied)


# The published config.json shapes of the classic worked examples, so they work offline.
SHAPES = {
    "llama-2-7b": lambda: _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama-2-13b": lambda: _llama(5120, 13824, 40, 40, 40, 32000, 4096),
    "llama-2-70b": lambda: _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "llama-3.1-8b": lambda: _llama(4096, 14336, 32, 32, 8, 128256, 131072, 500000.0),
    "llama-3.1-70b": lambda: _llama(8192, 28672, 80, 64, 8, 128256, 131072, 500000.0),
    "qwen3-0.6b": lambda: _llama(1024, 3072, 28, 16, 8, 151936, 40960, 1000000.0, True, 128,
                                 "Qwen3ForCausalLM"),
    "smollm2-135m": lambda: _llama(576, 1536, 30, 9, 3, 49152, 8192, 100000.0, True),
    "qwen3-30b-a3b": lambda: _moe(_llama(2048, 6144, 48, 32, 4, 151936, 40960, 1000000.0, False,
                                         128, "Qwen3MoeForCausalLM"), 128, 8, 768),
    "mixtral-8x7b": lambda: _moe(_llama(4096, 14336, 32, 32, 8, 32000, 32768, 1000000.0,
                                        arch="MixtralForCausalLM"), 8, 2, 14336),
    "gemma-3-270m": lambda: _gemma3(640, 2048, 18, 4, 1, 256, 262144, 32768, 512, 256),
    "gemma-3-27b": lambda: _gemma3(5376, 21504, 62, 32, 16, 128, 262208, 131072, 1024, 168,
                                   {"rope_type": "linear", "factor": 8.0}),
}


def _moe(c: ModelConfig, experts: int, top_k: int, inter: int) -> ModelConfig:
    c.moe = MoEConfig(num_experts=experts, top_k=top_k, expert_intermediate_size=inter,
                      renormalize=True)
    c.qk_norm = c.architecture == "Qwen3MoeForCausalLM"
    return c


def _gemma3(hidden, inter, layers, heads, kv_heads, head_dim, vocab, ctx, window, query_scalar,
            scaling=None) -> ModelConfig:
    from tuili.models.gemma3 import Gemma3ForCausalLM

    return Gemma3ForCausalLM.config_from_hf({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": ctx,
        "sliding_window": window, "query_pre_attn_scalar": query_scalar, "rope_scaling": scaling})


def model_config(name: str, revision: str | None = None) -> tuple[ModelConfig, str]:
    """(config, where it came from) for a model named any way tuili accepts, reading no weights."""
    from tuili.models.loader import ALIASES, resolve

    path = Path(name).expanduser()
    if name in SHAPES and not path.exists():
        if name in ALIASES:  # prefer the packaged file's own metadata when it is installed
            try:
                return _from_path(resolve(name)), str(resolve(name))
            except ModelLoadError:
                pass
        return SHAPES[name](), f"built-in shape {name}"
    if path.exists():
        return _from_path(path), str(path)
    if name in ALIASES:
        return _from_path(resolve(name)), name
    if name.startswith((".", "/", "~")) or name.endswith((".gguf", ".json")) or name.count("/") != 1:
        raise ModelLoadError(f"no such model or config: {name} (give a config.json, GGUF file, HF "
                             f"folder, hub id, or a built-in shape: {', '.join(SHAPES)})")
    return _from_hub(name, revision), f"hub {name}"


def _from_path(path: Path) -> ModelConfig:
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ModelLoadError(f"{path.parent}: no config.json")
    if path.suffix == ".gguf":
        from tuili.models.gguf_file import open_gguf  # metadata only; no tensor is dequantized

        return open_gguf(path).config()
    return _from_json(path)


def _from_json(path: Path) -> ModelConfig:
    try:
        raw = json.loads(path.read_text())
        if "text_config" in raw:  # multimodal wrappers keep the decoder's shape inside
            raw = {**raw, **raw["text_config"]}
        from tuili.models.registry import config_from_hf  # the family's own parser

        return config_from_hf(raw)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a usable model config ({type(e).__name__}: {e})") from e


def _from_hub(repo_id: str, revision: str | None) -> ModelConfig:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return _from_json(Path(hf_hub_download(repo_id, "config.json", revision=revision)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(f"could not get {repo_id}'s config.json from the Hugging Face Hub "
                             f"({type(e).__name__}); pass a local config.json or a built-in shape: "
                             f"{', '.join(SHAPES)}") from e
