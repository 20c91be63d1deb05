"""Where the 256 x (512 in, 256 out) workload's time goes, step by step, on an 8B-shaped model with
random weights: each engine step's prefill tokens, decode rows and host time (with async scheduling
the host waits on the step before, so in steady state a step's host time is its GPU time), summed
by kind of step beside each kind's floor (prefill: its FLOPs at the matmul rate; decode: its weight
and K/V bytes at the read bandwidth). One run per option set given, on the same saved model.

    python3 benchmarks/gpu_batch_steps.py                                # default options
    python3 benchmarks/gpu_batch_steps.py --options '{}' '{"max_num_batched_tokens": 16384}'
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import kv_bytes_per_token, linear_params  # noqa: E402
from benchmarks.gpu_workloads import FULL_LAYERS, random_prompt, workload  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.engine.engine import LLMEngine  # noqa: E402

READ_BPS, MATMUL_FLOPS = 4.18e12, 788e12  # the H200's measured ceilings (the issue's)


def run(folder: str, vocab: int, params: int, kv_tok: int, options: dict, device: str = "cuda",
        limit: int = 256) -> dict:
    llm = LLM(folder, dtype="bfloat16", device=device, max_model_len=8192, **options)
    steps: list[tuple[int, int, int, float]] = []  # prefill tokens, decode rows, context, seconds
    inner = LLMEngine.step

    last: list = []  # the batch queued by the call before: this call waits for its tokens
    calls: list[tuple[int, float, float]] = []  # per call: tokens queued, host ms to queue, ms
    runner = llm.engine.runner
    execute = runner.execute
    queued = [0.0]

    def timed_execute(*a, **kw):
        start = time.perf_counter()
        try:
            return execute(*a, **kw)
        finally:
            queued[0] = time.perf_counter() - start

    def timed(self):
        start = time.perf_counter()
        queued[0] = 0.0
        out = inner(self)
        secs = time.perf_counter() - start
        b = self.inflight.batch if self.inflight is not None else None
        calls.append((b.num_tokens if b is not None else 0, queued[0] * 1e3, secs * 1e3))
        if last:
            steps.append((*last.pop(), secs))
        batch = self.inflight.batch if self.inflight is not None else None
        if batch is not None:
            decodes = batch.num_decodes
            last.append((batch.num_tokens - decodes, decodes, sum(batch.starts)))
        return out

    prompts, outs = workload("batch256x512x256", vocab)
    prompts, outs = prompts[:limit], outs[:limit]
    greedy = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    rng = random.Random(9)  # warm on other prompts: the measured ones must miss the prefix cache
    llm.generate([random_prompt(rng, vocab, len(q)) for q in prompts[:8]], greedy[:8])
    LLMEngine.step = timed
    runner.execute = timed_execute
    try:
        start = time.perf_counter()
        llm.generate(prompts, greedy)
        wall = time.perf_counter() - start
    finally:
        LLMEngine.step = inner
        runner.execute = execute
    print("first calls (tokens queued, host ms to queue them, call ms): "
          + ", ".join(f"({n}, {q:.1f}, {c:.1f})" for n, q, c in calls[:6]))
    kinds: dict[str, list] = {}
    for prefill, decodes, context, secs in steps:
        kind = "prefill" if prefill and not decodes else "mixed" if prefill else "decode"
        if kind == "decode":
            kind += f" {min(256, 1 << (decodes - 1).bit_length())}"
            floor = (2 * params + context * kv_tok) / READ_BPS
            floor = max(floor, 2 * params * decodes / MATMUL_FLOPS)
        else:
            floor = 2 * params * (prefill + decodes) / MATMUL_FLOPS
        k = kinds.setdefault(kind, [0, 0.0, 0.0, 0])
        k[0] += 1
        k[1] += secs
        k[2] += floor
        k[3] += prefill + decodes
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"options": options, "wall_s": wall, "steps": len(steps),
            "kinds": {k: {"steps": v[0], "s": v[1], "floor_s": v[2], "tokens": v[3]}
                      for k, v in sorted(kinds.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--options", nargs="*", default=["{}"], help="JSON engine options per run")
    p.add_argument("--json")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = tempfile.mkdtemp()
    hf = build(args.shape, Path(folder), num_layers=args.layers or FULL_LAYERS[args.shape])
    cfg = hf.config
    params = linear_params(hf)
    kv_tok = kv_bytes_per_token(cfg)
    vocab = cfg.vocab_size
    del hf
    gc.collect()
    results = []
    for opts in args.options:
        res = run(folder, vocab, params, kv_tok, json.loads(opts), args.device, args.limit)
        results.append(res)
        print(f"\n{args.shape} {res['options'] or 'defaults'}: {res['wall_s']:.2f} s in "
              f"{res['steps']} steps")
        print(f"{'kind':<12}{'steps':>7}{'seconds':>10}{'floor s':>10}{'share':>8}{'tokens':>9}")
        for kind, k in res["kinds"].items():
            print(f"{kind:<12}{k['steps']:>7}{k['s']:>10.3f}{k['floor_s']:>10.3f}"
                  f"{k['floor_s'] / k['s']:>8.0%}{k['tokens']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
