"""Decode GEMV launch shapes chosen inside the whole batch-1 decode CUDA graph, not alone: for each
projection of a model (qkv, o, gate_up, down, LM head), candidate tiles, the PDL release point and
cuBLAS (None: cuBLAS with the norm / SiLU / add as separate kernels) are tried in turn, the
others held at the best found so far, and the graph's replay time decides (coordinate descent, a
few passes). Kernels that PDL overlaps with their neighbours read differently than they do alone
(BENCHMARKS.md, the eleventh session), so only the graph can say which shape wins.

    python3 benchmarks/gemv_graph_sweep.py [--shape llama3-8b] [--passes 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from benchmarks.gpu_workloads import FULL_LAYERS  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM  # noqa: E402
from tuili.engine.cuda_graphs import capture  # noqa: E402
from tuili.kernels import triton_module  # noqa: E402

gemv_module = triton_module("triton_gemv")
Config = gemv_module.GemvConfig
CUBLAS = "cublas"


def fma(block_n: int, block_k: int, warps: int, early: bool | None = None) -> Config:
    return Config(block_n=block_n, block_k=block_k, num_warps=warps, early_release=early)


def dot(block_n: int, block_k: int, stages: int = 3, warps: int = 4,
        early: bool | None = None) -> Config:
    return Config(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages,
                  use_dot=True, early_release=early)


def candidates(rows: int, k: int) -> list:
    """Tiles worth a try for one row of a [rows, k] weight (rows: 2n when gated)."""
    tiles = [fma(1, min(k, 4096), 4), fma(1, min(k, 4096), 8), fma(2, min(k, 4096), 8),
             fma(4, min(k, 4096), 8), fma(2, 2048, 4), fma(4, 2048, 8), fma(4, 1024, 4),
             fma(8, 1024, 8), dot(32, 512), dot(64, 256), dot(16, 512, warps=4), CUBLAS]
    if k > 4096:
        tiles += [fma(2, 8192, 8), fma(1, 8192, 8)]
    else:  # a resident grid looping over its tiles, released at its start (whole rows)
        row = 1 << (k - 1).bit_length()
        tiles += [persistent(1, row, 8, 4), persistent(2, row, 8, 2), persistent(2, row, 4, 4),
                  persistent(2, row, 8, 4), persistent(4, row, 8, 2), persistent(1, row, 4, 8)]
    return tiles


def persistent(block_n: int, block_k: int, warps: int, per_sm: int) -> Config:
    return Config(block_n=block_n, block_k=block_k, num_warps=warps, programs_per_sm=per_sm)


class Sweep:
    """Holds the per-projection overrides and patches the module's default_config to apply them."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.graphs = llm.engine.runner.graphs
        self.overrides: dict[tuple[int, int, bool], object] = {}
        self.default = gemv_module.default_config
        self.seen: dict[tuple[int, int, bool], object] = {}

        def patched(m, n, k, norm_pass=False, gated=False, gpu=None):
            key = (n, k, gated)
            chosen = self.default(m, n, k, norm_pass, gated, gpu)
            if m == 1:
                self.seen.setdefault(key, chosen)
                if key in self.overrides:
                    value = self.overrides[key]
                    return None if value == CUBLAS else value
            return chosen

        gemv_module.default_config = patched

    def replay_us(self) -> float:
        """Capture a fresh batch-1 decode graph under the current overrides and time its replay."""
        with torch.inference_mode():
            graphs, _, _ = capture([1], self.graphs._forward, "sweep")
        us = cuda_time(graphs[1].replay, repeat=60, warmup=5) * 1e6
        del graphs
        return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--context", type=int, default=160)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build(args.shape, Path(tmp), num_layers=FULL_LAYERS[args.shape])
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=1,
                  max_model_len=args.context + 64, gpu_memory_utilization=0.5)
        sweep = Sweep(llm)
        graphs = sweep.graphs
        width = -(-args.context // graphs.block_size)
        graphs.tables[:1, :width] = torch.arange(width, device="cuda")
        graphs.inputs[1][3].fill_(args.context)
        graphs.inputs[1][2].fill_(-1)  # write no K/V
        base = sweep.replay_us()
        print(f"{args.shape}: default shapes {base:.1f} us; projections seen at 1 row:")
        for key, cfg in sweep.seen.items():
            print(f"  n={key[0]} k={key[1]} gated={key[2]}: {cfg}")
        log = []
        best = base
        for rnd in range(args.passes):
            for key in list(sweep.seen):
                n, k, gated = key
                held = sweep.overrides.get(key, sweep.seen[key] or CUBLAS)
                results = {}
                tried = candidates(2 * n if gated else n, k)
                early_variants = [] if held == CUBLAS else [
                    replace(held, early_release=flag) for flag in (True, False)]
                for cand in tried + early_variants:
                    sweep.overrides[key] = cand
                    start = time.perf_counter()
                    try:
                        us = sweep.replay_us()
                    except Exception as e:  # a shape Triton cannot build (shared memory): skip it
                        print(f"    {cand}: failed ({type(e).__name__}: {str(e)[:80]})")
                        continue
                    results[str(cand)] = us
                    log.append(dict(round=rnd, n=n, k=k, gated=gated, config=str(cand), us=us))
                    print(f"    pass {rnd} n={n} k={k} gated={gated} {cand}: {us:.1f} us "
                          f"({time.perf_counter() - start:.1f}s)", flush=True)
                    if us < best:
                        best, held = us, cand
                sweep.overrides[key] = held
                print(f"  pass {rnd} n={n} k={k} gated={gated}: keep {held} -> {best:.1f} us",
                      flush=True)
        final = sweep.replay_us()
        print(f"\n{args.shape} batch-1 decode graph at context {args.context}: default {base:.1f} us,"
              f" swept {final:.1f} us ({final / base:.3f}x)")
        for key, cfg in sweep.overrides.items():
            print(f"  n={key[0]} k={key[1]} gated={key[2]}: {sweep.seen[key]} -> {cfg}")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(
                shape=args.shape, default_us=base, swept_us=final, log=log,
                chosen={str(k): str(v) for k, v in sweep.overrides.items()}), indent=2))


if __name__ == "__main__":
    main()
