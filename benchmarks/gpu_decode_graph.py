"""Replay time of the whole decode CUDA graph (all layers and the LM head, no host work) at small
batch sizes, random weights of real shapes (bf16): the GPU's share of a decode step.

    python benchmarks/gpu_decode_graph.py [--shapes smollm2-135m,llama3-8b] [--context 160]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from benchmarks.gpu_workloads import FULL_LAYERS  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM  # noqa: E402
from tuili.layers import backend  # noqa: E402

BATCHES = (1, 2, 4, 8)


def graph_replay_us(name: str, context: int, max_rows: list[int]) -> dict[str, dict[int, float]]:
    """{fused rows limit: {batch: replay us}} for each GEMV_MAX_ROWS setting in max_rows."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(name, Path(tmp), num_layers=FULL_LAYERS[name])
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        for limit in max_rows:
            backend.GEMV_MAX_ROWS = limit  # read when the graphs are captured
            llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=max(BATCHES),
                      max_model_len=context + 64, kv_cache_memory_gb=2)
            graphs = llm.engine.runner.graphs
            width = -(-context // graphs.block_size)
            graphs.tables[:, :width] = torch.arange(width, device="cuda")  # rows read blocks 0..
            graphs.seq_lens.fill_(context)
            graphs.slots.fill_(-1)  # write no K/V
            results[f"gemv_max_rows={limit}"] = {
                b: cuda_time(graphs.graphs[b].replay, repeat=50, warmup=5) * 1e6 for b in BATCHES}
            del llm, graphs
            gc.collect()
            torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--context", type=int, default=160)
    p.add_argument("--gemv-max-rows", default=str(backend.GEMV_MAX_ROWS),
                   help="comma-separated: fuse decode layers into GEMVs up to this many rows "
                   f"(default {backend.GEMV_MAX_ROWS}; 0: never, the unfused path)")
    p.add_argument("--json")
    args = p.parse_args()
    limits = [int(v) for v in args.gemv_max_rows.split(",")]
    results = {name: graph_replay_us(name, args.context, limits) for name in args.shapes.split(",")}
    for name, settings in results.items():
        for setting, times in settings.items():
            print(f"{name:<14} {setting:<16} decode graph replay, context {args.context}: "
                  + ", ".join(f"batch {b} {t:.0f} us" for b, t in times.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
