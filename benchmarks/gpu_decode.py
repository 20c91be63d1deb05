"""GPU batch-1 decode: tuili beside HF transformers on the same random weights of real shapes (bf16).

For each shape: time per output token at batch 1 after a 128-token prompt (decode only), for
tuili (LLM.stream) and for HF transformers (a bare forward loop with its KV cache), plus the
roofline floor: non-embedding weight bytes / HBM read bandwidth (3.0 TB/s measured on our H100).

    python benchmarks/gpu_decode.py [--shapes smollm2-135m,llama3-8b] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gpu.random_models import SHAPES, build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402

HBM_READ = 3.0e12  # bytes/s, a large reduction on our H100
FULL_LAYERS = {"smollm2-135m": 30, "llama3-8b": 32, "qwen3-0.6b": 28}


def tuili_ms_per_token(folder: Path, prompt: list[int], n: int) -> float:
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_memory_gb=4)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    best = float("inf")
    for _ in range(3):
        stamps = []
        for _ in llm.stream(prompt, params):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    del llm
    torch.cuda.empty_cache()
    return best * 1e3


@torch.inference_mode()
def hf_ms_per_token(model, prompt: list[int], n: int) -> float:
    best = float("inf")
    for _ in range(3):
        out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / (n - 1))
    return best * 1e3


def weight_bytes(model) -> int:
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not embed or model.config.tie_word_embeddings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            hf = build(name, Path(tmp), num_layers=FULL_LAYERS[name])
            print(f"{name}: built and saved in {time.perf_counter() - start:.0f}s", flush=True)
            prompt = torch.randint(2, SHAPES[name][2]["vocab_size"], (128,),
                                   generator=torch.Generator().manual_seed(0)).tolist()
            hf_ms = hf_ms_per_token(hf, prompt, args.tokens)
            floor = weight_bytes(hf) / HBM_READ * 1e3
            del hf
            torch.cuda.empty_cache()
            ours = tuili_ms_per_token(Path(tmp), prompt, args.tokens)
        rows.append(dict(shape=name, tuili_ms=ours, hf_ms=hf_ms, floor_ms=floor))
    print(f"\n{'shape':<14} {'tuili ms/tok':>12} {'HF ms/tok':>10} {'floor ms':>9} "
          f"{'tuili/floor':>11} {'HF/tuili':>9}")
    for r in rows:
        print(f"{r['shape']:<14} {r['tuili_ms']:12.2f} {r['hf_ms']:10.2f} {r['floor_ms']:9.2f} "
              f"{r['floor_ms'] / r['tuili_ms']:10.0%} {r['hf_ms'] / r['tuili_ms']:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
