"""A/B of an environment switch (or of another tree) on one model: each arm in a process of its own
over the same saved model, the arms alternating over several rounds on one machine. Reports
batch-1 decode per token and graph replay at a short (~130) and a long (~8k) context, and checks
that the greedy tokens agree. A process per arm, since the engine reads its settings (the kernel
backend, the GPU traits the launch shapes follow) once, when the model is built.

    python3 benchmarks/gpu_ab.py --shape llama3-8b --env TUILI_TUNE_AS=h100,h200 [--rounds 2]
    python3 benchmarks/gpu_ab.py --base /path/to/older/tree      # this tree against that one
    python3 benchmarks/gpu_ab.py --base A --base B --no-self --cases decode,ttft,batch
                                                                # two other trees, more cases
Cases: decode (batch-1 decode and replay, ~130 and ~8k), ttft (median of 5 prompts of 2048
tokens), batch (256 x (512 in, 256 out) under the engine's default options: wall seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(folder: str, vocab: int, cases: list[str]) -> None:
    """One arm: the cases' timings, then the greedy tokens, as one JSON line. (The functions come
    from the arm's own tree's benchmarks, which older trees have too.)"""
    import gc

    from benchmarks.gpu_workloads import (replay_ms, tuili_decode_ms, tuili_throughput,
                                          tuili_ttft_ms, workload)
    from tuili import LLM, SamplingParams

    short = [random.Random(0).randrange(2, vocab) for _ in range(128)]
    res = {}
    if "decode" in cases:
        llm = LLM(folder, dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=9000,
                  gpu_memory_utilization=0.5)
        long = [random.Random(1).randrange(2, vocab) for _ in range(8000)]
        for name, prompt in (("~130", short), ("~8k", long)):
            res[f"decode {name}"] = min(tuili_decode_ms(llm, prompt) for _ in range(2))
            res[f"replay {name}"] = min(replay_ms(llm)[0] for _ in range(3))
        del llm
        gc.collect()
    if "ttft" in cases or "batch" in cases:
        llm = LLM(folder, dtype="bfloat16", device="cuda", max_model_len=8192)  # default options
        if "ttft" in cases:
            rng = random.Random(2)
            prompts = [[rng.randrange(2, vocab) for _ in range(2048)] for _ in range(5)]
            res["ttft 2048"] = tuili_ttft_ms(llm, prompts)
        if "batch" in cases:
            prompts, outs = workload("batch256x512x256", vocab)
            rng = random.Random(3)  # a warm run first, on prompts the measured run won't hit
            tuili_throughput(llm, [[rng.randrange(2, vocab) for _ in range(512)]
                                   for _ in range(16)], [64] * 16)
            res["batch 256 s"] = tuili_throughput(llm, prompts, outs)[0]
    else:
        llm = LLM(folder, dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=9000,
                  gpu_memory_utilization=0.5)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    res["tokens"] = list(llm.generate([short], greedy)[0].outputs[0].token_ids)
    print("AB " + json.dumps(res), flush=True)


def run_arm(folder: Path, vocab: int, env: dict, pythonpath: str, cases: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--vocab", str(vocab),
           "--cases", cases]
    out = subprocess.run(cmd, env={**os.environ, **env, "PYTHONPATH": pythonpath},
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("AB ")]
    if out.returncode or not lines:
        raise RuntimeError(f"arm {env or pythonpath} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--env", default="", help="NAME=value1,value2,...")
    p.add_argument("--base", action="append", default=[],
                   help="another tuili tree to run as one more arm (may be repeated)")
    p.add_argument("--no-self", action="store_true", help="run only the --base trees")
    p.add_argument("--cases", default="decode", help="any of decode,ttft,batch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.vocab, args.cases.split(","))

    import gc

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_workloads import FULL_LAYERS
    from tests.gpu.random_models import build

    here = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    name, _, values = args.env.partition("=")
    arms = {f"{name}={v}": ({name: v}, here) for v in values.split(",")} if name else {}
    arms = arms or ({} if args.no_self else {"this tree": ({}, here)})
    for base in args.base:
        arms[Path(base).name] = ({}, f"{base}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    folder = Path(tempfile.mkdtemp())
    vocab = build(args.shape, folder, num_layers=FULL_LAYERS[args.shape]).config.vocab_size
    gc.collect()
    torch.cuda.empty_cache()
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for rnd in range(args.rounds):
        for arm, (env, path) in arms.items():
            results[arm].append(run_arm(folder, vocab, env, path, args.cases))
            print(f"{args.shape} round {rnd} {arm}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in results[arm][-1].items() if k != "tokens"), flush=True)
    keys = [k for k in results[next(iter(arms))][0] if k != "tokens"]
    print(f"\n{args.shape}, {args.rounds} rounds (best / mean, ms)")
    print(f"{'arm':<22}" + "".join(f"{k:>18}" for k in keys))
    for arm, rows in results.items():
        cells = [f"{min(r[k] for r in rows):.3f} / {sum(r[k] for r in rows) / len(rows):.3f}"
                 for k in keys]
        print(f"{arm:<22}" + "".join(f"{c:>18}" for c in cells))
    tokens = [r["tokens"] for rows in results.values() for r in rows]
    print(f"greedy tokens {'agree' if all(t == tokens[0] for t in tokens) else 'DIFFER'}")


if __name__ == "__main__":
    main()
