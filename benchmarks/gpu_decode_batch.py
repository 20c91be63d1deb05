"""Where a large decode batch's step goes, on the 8B shape (the 256 x (512, 256) workload spends
half its time in such steps): each kernel of an eager engine step at batch 256 (torch.profiler,
summed by kernel name, per step), then the two big parts alone at the same shape: cuBLAS at 256
rows for each projection, and decode attention over a sweep of launch shapes.

    python3 benchmarks/gpu_decode_batch.py [--batch 256] [--context 640]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import cuda_time  # noqa: E402
from benchmarks.gpu_kernels import paged  # noqa: E402
from tuili.kernels import triton_attention  # noqa: E402
from tuili.kernels.triton_attention import DecodeConfig  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 4096, 32, 8, 128, 14336, 128256, 32
PROJECTIONS = {"qkv": (HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "o": (HIDDEN, HIDDEN),
               "gate_up": (HIDDEN, 2 * FFN), "down": (FFN, HIDDEN)}


def engine_profile(batch: int, context: int, steps: int = 5) -> None:
    from tests.gpu.random_models import build
    from tuili import LLM, SamplingParams
    from tuili.engine.engine import LLMEngine

    folder = tempfile.mkdtemp()
    build("llama3-8b", Path(folder), num_layers=LAYERS)
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(folder, dtype="bfloat16", device="cuda", max_model_len=4096, enforce_eager=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(context)] for _ in range(batch)]
    inner, seen = LLMEngine.step, []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])

    def step(self):
        b = self.inflight.batch if self.inflight is not None else None
        if b is not None and b.num_decodes == len(b) == batch:
            seen.append(1)
            if len(seen) == 20:
                torch.cuda.synchronize()
                prof.start()
            if len(seen) == 20 + steps:
                torch.cuda.synchronize()
                prof.stop()
        return inner(self)

    LLMEngine.step = step
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20 + steps + 5,
                                             ignore_eos=True))
    finally:
        LLMEngine.step = inner
    print_kernels(prof, steps, f"eager engine decode step, batch {batch}, context ~{context + 22}")
    prefill_profile(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def prefill_profile(llm, tokens: int = 2048) -> None:
    """The kernels of one eager prefill of a `tokens`-token prompt (time to first token)."""
    from tuili import SamplingParams

    rng = random.Random(5)
    one = SamplingParams(temperature=0, max_tokens=1)
    for _ in range(2):  # warm: compiles, allocator, cuBLAS heuristics
        llm.generate([[rng.randrange(2, VOCAB) for _ in range(tokens)]], one)
    prompt = [rng.randrange(2, VOCAB) for _ in range(tokens)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], one)
    print_kernels(prof, 1, f"eager prefill of {tokens} tokens")


def print_kernels(prof, steps: int, what: str) -> None:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps / 1e3, e.count // steps, e.key))
    rows.sort(reverse=True)
    print(f"\n{what}: {sum(r[0] for r in rows):.2f} ms of kernels a step")
    for ms, n, name in rows[:18]:
        print(f"{ms:8.3f} ms {n:5d}x  {name[:110]}")


def projections(batch: int) -> None:
    print(f"\ncuBLAS at {batch} rows (x {LAYERS} layers; the LM head once)")
    total = 0.0
    for name, (k, n) in {**PROJECTIONS, "lm_head": (HIDDEN, VOCAB)}.items():
        x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        s = cuda_time(lambda: torch.nn.functional.linear(x, w), graph=True)
        times = 1 if name == "lm_head" else LAYERS
        total += s * times
        print(f"  {name:<8} {s * 1e6:8.1f} us  {2 * batch * k * n / s / 1e12:6.0f} TFLOP/s"
              f"  {k * n * 2 / s / 1e12:5.2f} TB/s weights  x{times} = {s * times * 1e3:.2f} ms")
    print(f"  all linears: {total * 1e3:.2f} ms a step")


def attention(batch: int, context: int) -> None:
    rng = random.Random(1)
    lens_list = [rng.randint(context - 128, context + 128) for _ in range(batch)]
    k, v, tables = paged(lens_list)
    lens = torch.tensor(lens_list, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    kv_bytes = sum(lens_list) * KV_HEADS * HEAD_DIM * 2 * 2
    default = triton_attention.decode_config(batch, KV_HEADS, HEAD_DIM, q.device)
    print(f"\ndecode attention, batch {batch}, contexts {context} +- 128 ({kv_bytes / 1e9:.2f} GB a "
          f"layer); default {default}")
    results = []
    for splits, block_n, warps, stages in itertools.product((1, 2), (32, 64, 128), (4, 8),
                                                            (2, 3)):
        cfg = DecodeConfig(splits, block_n, warps, stages)
        try:
            s = cuda_time(lambda: triton_attention.decode_attention(
                q, k, v, tables, lens, HEAD_DIM ** -0.5, out=out, config=cfg), graph=True)
        except Exception as exc:  # an out-of-resources shape
            print(f"  {cfg}: {type(exc).__name__}")
            continue
        results.append((s, cfg))
    results.sort(key=lambda r: r[0])
    base = cuda_time(lambda: triton_attention.decode_attention(
        q, k, v, tables, lens, HEAD_DIM ** -0.5, out=out, config=default), graph=True)
    print(f"  default: {base * 1e6:.1f} us, {kv_bytes / base / 1e12:.2f} TB/s; x{LAYERS} = "
          f"{base * LAYERS * 1e3:.2f} ms")
    for s, cfg in results[:8]:
        print(f"  {s * 1e6:8.1f} us  {kv_bytes / s / 1e12:5.2f} TB/s  {cfg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--parts", default="kernels,engine")
    args = p.parse_args()
    if "kernels" in args.parts:
        projections(args.batch)
        attention(args.batch, args.context)
    if "engine" in args.parts:
        engine_profile(args.batch, args.context - 22)


if __name__ == "__main__":
    main()
