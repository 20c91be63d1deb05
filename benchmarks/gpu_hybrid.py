"""Hybrid decode at long context on the GPU: a random-weight granite-4.0-h-micro-shaped model (40
layers, 4 of them attention, 36 Mamba-2 mixers with a fixed state per sequence) beside a
same-size full-attention Llama (40 attention layers, the same hidden size, heads and MLP), both
in tuili, bf16; decode ms per token at each context and batch, and the bytes a step reads per
sequence beyond the weights (K/V, and the hybrid's states). The hybrid's columns should stay flat
in context; the Llama's grow with its K/V. Each is timed with its decode CUDA graphs and eagerly.

    python benchmarks/gpu_hybrid.py [--contexts 1024 8192 32768] [--batches 1 8] [--steps 64]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_gemma3 import tuili_ms_per_token  # noqa: E402
from tests.gpu.hybrid_models import SHAPES, build  # noqa: E402
from tests.gpu.random_models import byte_tokenizer  # noqa: E402
from tuili import LLM  # noqa: E402
from tuili.engine.state_cache import state_bytes_per_seq  # noqa: E402

HYBRID = "granite-4.0-h-micro"
LAYERS = 40


def build_llama(folder: Path) -> int:
    """The Llama beside it: granite-4.0-h-micro's hidden size, heads, MLP and vocabulary, every
    layer attention (with rotary). Returns its parameter count."""
    import transformers

    s = SHAPES[HYBRID]
    config = transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["shared_intermediate_size"], num_hidden_layers=LAYERS,
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        max_position_embeddings=s["max_position_embeddings"], rms_norm_eps=s["rms_norm_eps"],
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return _free(model)


def _free(model) -> int:
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return params


def kv_per_token(llm: LLM) -> int:
    layers = llm.engine.runner.model.attention_layers()
    return sum(2 * a.num_kv_heads * a.head_dim * 2 for a in layers)


def run(folder: Path, args, eager: bool) -> tuple[dict, int, int]:
    """{(batch, context): ms/token}, K/V bytes per token, state bytes per sequence."""
    top = max(args.contexts) + args.steps + 8
    probe_kv = 2 * LAYERS * SHAPES[HYBRID]["num_key_value_heads"] * 128 * 2  # at most this
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=top,
              kv_cache_memory_gb=max(4, max(args.batches) * top * probe_kv / 2**30 * 1.2),
              max_num_seqs=max(args.batches), enforce_eager=eager)
    times = {(b, c): tuili_ms_per_token(llm, b, c, args.steps)
             for b in args.batches for c in args.contexts}
    kv, state = kv_per_token(llm), state_bytes_per_seq(llm.engine.runner.model, torch.bfloat16)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return times, kv, state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    hybrid_params = _free(build(HYBRID, root / "hybrid", LAYERS))
    llama_params = build_llama(root / "llama")
    hybrid, hkv, hstate = run(root / "hybrid", args, eager=False)
    hybrid_eager, _, _ = run(root / "hybrid", args, eager=True)
    llama, lkv, _ = run(root / "llama", args, eager=False)
    llama_eager, _, _ = run(root / "llama", args, eager=True)
    print(f"{HYBRID} shape ({hybrid_params / 1e9:.2f}B params, {LAYERS} layers, 4 attention) vs "
          f"a full-attention Llama ({llama_params / 1e9:.2f}B, {LAYERS} attention layers); bf16; "
          f"{torch.cuda.get_device_name()}")
    print(f"hybrid: {hkv / 1024:.0f} KiB K/V per token + {hstate / 2**20:.1f} MiB of states per "
          f"sequence; Llama: {lkv / 1024:.0f} KiB K/V per token")
    print("| batch | context | hybrid state+KV read/seq | Llama KV read/seq | hybrid ms/token "
          "| Llama ms/token | hybrid eager | Llama eager |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        for c in args.contexts:
            print(f"| {b} | {c:,} | {(hkv * c + hstate) / 2**20:.0f} MiB | "
                  f"{lkv * c / 2**20:.0f} MiB | {hybrid[b, c]:.2f} | {llama[b, c]:.2f} | "
                  f"{hybrid_eager[b, c]:.2f} | {llama_eager[b, c]:.2f} |", flush=True)
    lo, hi = min(args.contexts), max(args.contexts)
    for b in args.batches:
        print(f"batch {b}, {lo:,} -> {hi:,} tokens of context: hybrid "
              f"{hybrid[b, hi] / hybrid[b, lo]:.2f}x, "
              f"Llama {llama[b, hi] / llama[b, lo]:.2f}x (graphs); at {hi:,} the hybrid takes "
              f"{hybrid[b, hi] / llama[b, hi]:.2f}x the Llama's time")


if __name__ == "__main__":
    main()
