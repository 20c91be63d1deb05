"""A/B of an environment switch on one model in one process: the decode CUDA graphs are recaptured
under each setting in turn, over several rounds, so no instance-to-instance or machine-to-machine
noise enters the comparison. Reports batch-1 graph replay at a short (~130) and a long (~8k)
context and the decode time per token, and checks the greedy tokens agree.

    python benchmarks/gpu_ab.py --shape llama3-8b --env TUILI_QKV_ROPE=1,0 [--rounds 3]

The switch must be read when the graphs are captured (as TUILI_QKV_ROPE is), not once per process.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_workloads import FULL_LAYERS, replay_ms, tuili_decode_ms  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(FULL_LAYERS))
    p.add_argument("--env", required=True, help="NAME=value1,value2,...")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    name, _, values = args.env.partition("=")
    values = values.split(",")

    folder = Path(tempfile.mkdtemp())
    vocab = build(args.shape, folder, num_layers=FULL_LAYERS[args.shape]).config.vocab_size
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=9000,
              gpu_memory_utilization=0.5)
    graphs = llm.engine.runner.graphs
    short = [random.Random(0).randrange(2, vocab) for _ in range(128)]
    long = [random.Random(1).randrange(2, vocab) for _ in range(8000)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in values}
    tokens = {}
    for rnd in range(args.rounds):
        for value in values:
            os.environ[name] = value
            graphs.graphs.clear()
            graphs._capture()
            replays = []
            for prompt in (short, long):  # the cache holds the prompt: replays attend over it
                llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
                replays.append(min(replay_ms(llm)[0] for _ in range(3)))
            decode = tuili_decode_ms(llm, short)
            results[value].append((*replays, decode))
            tokens.setdefault(value, llm.generate([short], greedy)[0].outputs[0].token_ids)
            print(f"{args.shape} round {rnd} {name}={value}: replay {replays[0]:.3f} ms (~130), "
                  f"{replays[1]:.3f} ms (~8k), decode {decode:.3f} ms a token", flush=True)
    print(f"\n{args.shape}: {name}, {args.rounds} rounds (best / mean, ms)")
    print(f"{'value':<8} {'replay ~130':>16} {'replay ~8k':>16} {'decode a token':>16}")
    for value, rows in results.items():
        cells = [f"{min(c):.3f} / {sum(c) / len(c):.3f}" for c in zip(*rows)]
        print(f"{value:<8} " + " ".join(f"{c:>16}" for c in cells))
    same = all(t == tokens[values[0]] for t in tokens.values())
    print(f"greedy tokens {'agree' if same else 'DIFFER'} across settings")


if __name__ == "__main__":
    main()
