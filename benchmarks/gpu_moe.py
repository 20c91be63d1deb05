"""Mixture of experts on the GPU: tuili beside HF transformers on random bf16 weights of
Qwen3-30B-A3B's shape (its layers cut to --layers; the full 48 need 61 GB of disk to save).

Batch 1: decode ms/token against the floor of reading, once per token, the 8 chosen experts' and
every dense weight (attention, routers, LM head) at the read bandwidth measured in the same run.
Batch 64: decode throughput (tok/s) against reading the experts 64 tokens choose (nearly all 128)
and the dense weights once per step. The fused kernel alone is also timed in a CUDA graph, per
layer, against its own floor (the chosen experts' bytes). HF runs a bare forward loop with its KV
cache (batch 1) and `generate` on a static batch (batch 64).

    python benchmarks/gpu_moe.py [--layers 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time, measure_ceilings, now  # noqa: E402
from benchmarks.gpu_workloads import hf_decode_ms, hf_throughput, tuili_decode_ms  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.analysis.moe import expected_experts  # noqa: E402
from tuili.kernels import reference_moe, triton_moe  # noqa: E402

SHAPE = "qwen3-30b-a3b"
HIDDEN, INTER, EXPERTS, TOP_K, VOCAB = 2048, 768, 128, 8, 151936
PROMPT, OUT_TOKENS, BATCH = 128, 64, 64


def weight_bytes(hf) -> tuple[int, int]:
    """(one expert's bytes in all layers, every other matmul weight's bytes: attention, routers,
    LM head; the embedding table is a lookup)."""
    expert = expert_dense = 0
    embed = hf.get_input_embeddings().weight
    for name, p in hf.named_parameters():
        if p is embed or "norm" in name:
            continue
        if ".experts." in name:
            expert += p.numel() * 2 // EXPERTS  # bf16
        else:
            expert_dense += p.numel() * 2
    return expert, expert_dense


def kernel_rows(layers: int, bandwidth: float) -> list[dict]:
    """The fused kernel alone on one layer's experts, in a CUDA graph, by tokens per step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=g) * 0.02).bfloat16()
    per_expert = (w13[0].numel() + w2[0].numel()) * 2
    rows = []
    for tokens in (1, 8, 64, 512):
        x = torch.randn(tokens, HIDDEN, device="cuda").bfloat16()
        weights, ids = reference_moe.route(torch.randn(tokens, EXPERTS, device="cuda"), TOP_K, True)
        chosen = ids.unique().numel()
        t = cuda_time(lambda: triton_moe.fused_moe(x, w13, w2, weights, ids), graph=True)
        floor = chosen * per_expert / bandwidth
        rows.append({"tokens": tokens, "experts_read": chosen, "kernel_us": t * 1e6,
                     "floor_us": floor * 1e6, "of_floor": floor / t,
                     "tiles": str(triton_moe.default_config(tokens * TOP_K, EXPERTS))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ceilings = measure_ceilings()
    bw = ceilings["read_bytes_per_s"]
    print(f"read bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} "
          f"TFLOP/s; {SHAPE} shape, {args.layers} of its 48 layers, random bf16 weights")
    rng = random.Random(0)
    prompt = [rng.randrange(2, VOCAB) for _ in range(PROMPT)]
    batch = [[rng.randrange(2, VOCAB) for _ in range(PROMPT)] for _ in range(BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(SHAPE, Path(tmp), num_layers=args.layers)
        expert_b, dense_b = weight_bytes(hf)
        floor_1 = (TOP_K * expert_b + dense_b) / bw
        floor_64 = (expected_experts(BATCH, EXPERTS, TOP_K) * expert_b + dense_b) / bw
        with torch.inference_mode():
            hf_1 = hf_decode_ms(hf, prompt)
            hf_64 = hf_throughput(hf, batch, [OUT_TOKENS] * BATCH)
        del hf
        torch.cuda.empty_cache()
        llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=BATCH,
                  gpu_memory_utilization=0.85)
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        ours_1 = tuili_decode_ms(llm, prompt)
        params = SamplingParams(temperature=0, max_tokens=OUT_TOKENS, ignore_eos=True)
        llm.generate(batch[:8], params)
        start = now()
        outs = llm.generate(batch, params)
        ours_64 = sum(len(o.outputs[0].token_ids) for o in outs) / (now() - start)
        del llm
    ceiling_64 = BATCH / floor_64
    rows = [("batch 1 decode", "ms/token", ours_1, hf_1, floor_1 * 1e3, floor_1 * 1e3 / ours_1),
            (f"batch {BATCH} ({PROMPT} in, {OUT_TOKENS} out)", "tok/s", ours_64, hf_64,
             ceiling_64, ours_64 / ceiling_64)]
    print(f"\n{'case':<28} {'unit':<9} {'tuili':>9} {'HF':>9} {'tuili/HF':>9} {'floor':>9} "
          f"{'of floor':>8}")
    for case, unit, ours, theirs, floor, share in rows:
        ratio = theirs / ours if unit == "ms/token" else ours / theirs
        print(f"{case:<28} {unit:<9} {ours:9.2f} {theirs:9.2f} {ratio:8.2f}x {floor:9.2f} "
              f"{share:7.0%}")
    print(f"(floor: the 8 chosen experts' {TOP_K * expert_b / 1e9:.2f} GB + dense "
          f"{dense_b / 1e9:.2f} GB "
          f"per token at batch 1; at batch {BATCH} {expected_experts(BATCH, EXPERTS, TOP_K):.1f} "
          f"experts per layer + dense per step, decode only: throughput includes prefill)")
    krows = kernel_rows(args.layers, bw)
    print(f"\nfused MoE kernel, one layer, CUDA graph:\n{'tokens':>6} {'experts':>7} "
          f"{'us':>8} {'floor us':>8} {'of floor':>8}  tiles")
    for r in krows:
        print(f"{r['tokens']:6d} {r['experts_read']:7d} {r['kernel_us']:8.1f} {r['floor_us']:8.1f} "
              f"{r['of_floor']:7.0%}  {r['tiles']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceilings, "layers": args.layers,
                                               "rows": rows, "kernel": krows}, indent=2))


if __name__ == "__main__":
    main()
