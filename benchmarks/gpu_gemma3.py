"""Gemma 3 decode at long context on the GPU, beside HF transformers: a random-weight model of
Gemma 3 1B's shape (26 layers, window 512, every 6th layer global), bf16, batch 1 and 8; ms per
token at each context, and the K/V bytes a step reads with the windows and without.

    python benchmarks/gpu_gemma3.py [--contexts 1024 8192 16384] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import now  # noqa: E402
from tests.gpu.random_models import byte_tokenizer  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.analysis.memory import kv_bytes_per_token, kv_bytes_read  # noqa: E402
from tuili.models.registry import config_from_hf  # noqa: E402

SHAPE = dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
             sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6,
             tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)


def build(folder: Path):
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**SHAPE))
    hf = hf.to(torch.bfloat16).eval()
    hf.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return hf


@torch.inference_mode()
def hf_ms_per_token(hf, batch: int, context: int, steps: int) -> float:
    """HF's own decode loop (its sliding-window cache): prefill, then time `steps` steps."""
    ids = torch.randint(2, 200, (batch, context), device="cuda")
    out = hf(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    cache = out.past_key_values
    for _ in range(3):  # warm-up
        out = hf(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    start = now()
    for _ in range(steps):
        out = hf(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (now() - start) / steps * 1e3


def tuili_ms_per_token(llm, batch: int, context: int, steps: int) -> float:
    """Decode time per step: a run of `steps` + 1 tokens minus a run of 1 (the prefill)."""
    prompts = [torch.randint(2, 200, (context,)).tolist() for _ in range(batch)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    llm.generate(prompts, one)  # warm-up (and the prefix cache: both runs below hit it)
    start = now()
    llm.generate(prompts, one)
    prefill = now() - start
    start = now()
    llm.generate(prompts, many)
    return (now() - start - prefill) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gemma3-bench-"))
    hf = build(folder)
    config = config_from_hf({**SHAPE, "architectures": ["Gemma3ForCausalLM"],
                             "layer_types": hf.config.layer_types})
    top = max(args.contexts) + args.steps + 8
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_model_len=top,
              kv_cache_memory_gb=max(4, max(args.batches) * top * kv_bytes_per_token(config) / 2**30 * 1.2),
              max_num_seqs=max(args.batches))
    print(f"Gemma 3 1B shape, bf16, {sum(1 for w in config.windows() if w)} of "
          f"{config.num_layers} layers sliding over {SHAPE['sliding_window']} tokens; "
          f"{torch.cuda.get_device_name()}")
    print("| batch | context | KV read/step/seq (windowed) | without windows | tuili ms/token | "
          "HF ms/token | HF / tuili |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            read = kv_bytes_read(config, context) / 2**20
            full = kv_bytes_per_token(config) * context / 2**20
            ours = tuili_ms_per_token(llm, batch, context, args.steps)
            theirs = hf_ms_per_token(hf, batch, context, args.steps)
            print(f"| {batch} | {context:,} | {read:.1f} MiB | {full:.1f} MiB | {ours:.2f} | "
                  f"{theirs:.2f} | {theirs / ours:.2f}x |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
