"""Batch-1 decode of one random-weight model, bf16 against each quantization at load (int8, fp8,
int4), in one process, beside each format's read floor (its weight bytes at this GPU's measured
read bandwidth). Greedy tokens' agreement with bf16 is printed too (random weights: near ties).
A quantized method's decode GEMVs carry the norms, SiLU and residual adds as the bf16 one's do;
--unfused also times each with those as their own kernels (METHOD-unfused rows).

    python3 benchmarks/gpu_quant.py [--shape llama3-8b] [--methods none,int8,fp8,int4] [--unfused]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import _read_bandwidth  # noqa: E402
from benchmarks.gpu_workloads import FULL_LAYERS, tuili_decode_ms  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.layers import backend  # noqa: E402

BITS = {"none": 16, "int8": 8, "fp8": 8, "int4": 4.25}  # int4: + a 16-bit scale per 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--methods", default="none,int8,fp8,int4")
    p.add_argument("--unfused", action="store_true",
                   help="also time each quantized method with its fusions off")
    args = p.parse_args()
    runs = [(m, True) for m in args.methods.split(",")]
    if args.unfused:
        runs += [(m, False) for m in args.methods.split(",") if m != "none"]
    read = _read_bandwidth(torch.ones(2**31, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}: measured read {read / 1e12:.2f} TB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(args.shape, Path(tmp), num_layers=FULL_LAYERS[args.shape])
        vocab = hf.config.vocab_size
        head = hf.get_output_embeddings().weight.numel()
        layers = sum(p.numel() for n, p in hf.named_parameters()
                     if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        prompt = [random.Random(0).randrange(2, vocab) for _ in range(128)]
        greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        rows, base = [], None
        for method, fused in runs:
            backend.QUANT_FUSIONS = fused  # read at each eager call and as graphs are captured
            llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=1024,
                      gpu_memory_utilization=0.5, quantization=method)
            ms = min(tuili_decode_ms(llm, prompt) for _ in range(2))
            tokens = list(llm.generate([prompt], greedy)[0].outputs[0].token_ids)
            base = base or tokens
            agree = sum(a == b for a, b in zip(tokens, base)) / len(base)
            floor = (layers * BITS[method] / 8 + head * 2) / read * 1e3
            label = method if fused else f"{method}-unfused"
            rows.append((label, ms, floor, agree))
            print(f"{args.shape} {label}: {ms:.3f} ms/token (floor {floor:.2f} ms), greedy "
                  f"agreement with bf16 {agree:.2f}", flush=True)
            del llm
            backend.QUANT_FUSIONS = True
            gc.collect()
            torch.cuda.empty_cache()
    print(f"\n{'weights':<14}{'ms/token':>10}{'floor ms':>10}{'floor/ms':>10}{'agree':>8}")
    for label, ms, floor, agree in rows:
        print(f"{label:<14}{ms:>10.3f}{floor:>10.2f}{floor / ms:>10.2f}{agree:>8.2f}")


if __name__ == "__main__":
    main()
