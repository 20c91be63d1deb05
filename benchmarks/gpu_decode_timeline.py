"""Where a batch-1 decode step's GPU time goes, kernel by kernel, inside the decode CUDA graph:
random weights of a real shape (bf16), one replay of the engine's own batch-1 graph under the
torch profiler, its kernels in order with their grids. A layer's kernels repeat, so each position
of the repeating run is reported as the median over the layers: the kernel's duration and its
time "on the path" (its end minus the previous kernel's end, so the overlap programmatic
dependent launch buys is credited to the kernel before), beside the bytes it must read at the
GPU's measured read bandwidth. What is left between the sum of the floors and the replay is what
launches, ramps and drains cost.

    python3 benchmarks/gpu_decode_timeline.py [--shapes llama3-8b,qwen2.5-7b] [--context 160]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time, measure_ceilings  # noqa: E402
from benchmarks.gpu_workloads import FULL_LAYERS  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM  # noqa: E402


def layer_bytes(config, context: int) -> dict[str, int]:
    """Bytes each part of a decode layer must read at batch 1 (bf16)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    ffn = config.intermediate_size
    return {"qkv": 2 * h * (heads + 2 * kv) * d, "attention": 2 * 2 * kv * d * context,
            "o": 2 * heads * d * h, "gate_up": 2 * h * 2 * ffn, "down": 2 * ffn * h}


def kernels_of_replay(replay, path: Path) -> list[dict]:
    """The kernels of one replay (the last of three), from the profiler's trace, in start order."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    marks = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            replay()
            torch.cuda.synchronize()
            marks.append(len(marks))
    prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    per = len(kernels) // 3
    return kernels[-per:]


def period_of(names: list[str], layers: int) -> tuple[int, int]:
    """(start, period) of the longest run of `layers` repeats of the same kernel sequence."""
    for period in range(2, 40):
        for start in range(0, len(names) - period * layers + 1):
            run = names[start:start + period * layers]
            if all(run[i] == run[i % period] for i in range(len(run))):
                return start, period
    raise ValueError("no repeating layer found in the graph's kernels")


def short(name: str) -> str:
    name = name.split("(")[0].split("<")[0]
    return name[:44]


def timeline(shape: str, context: int, read_bw: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(shape, Path(tmp), num_layers=FULL_LAYERS[shape])
        config = hf.config
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(tmp, dtype="bfloat16", device="cuda", max_num_seqs=1,
                  max_model_len=context + 64, gpu_memory_utilization=0.5)
        graphs = llm.engine.runner.graphs
        width = -(-context // graphs.block_size)
        graphs.tables[:1, :width] = torch.arange(width, device="cuda")
        graphs.inputs[1][3].fill_(context)
        graphs.inputs[1][2].fill_(-1)  # write no K/V
        replay = graphs.graphs[1].replay
        replay_us = cuda_time(replay, repeat=100, warmup=10) * 1e6
        kernels = kernels_of_replay(replay, Path(tmp) / "trace.json")
    layers = config.num_hidden_layers
    names = [short(k["name"]) for k in kernels]
    start, period = period_of(names, layers)
    ends = [k["ts"] + k["dur"] for k in kernels]
    on_path = [ends[0] - kernels[0]["ts"]] + [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    rows = []
    for j in range(period):
        idx = [start + j + period * i for i in range(layers)]
        k = kernels[idx[0]]
        rows.append(dict(kernel=names[idx[0]], grid=k["args"].get("grid"),
                         block=k["args"].get("block"),
                         dur=statistics.median(kernels[i]["dur"] for i in idx),
                         path=statistics.median(on_path[i] for i in idx)))
    head = [dict(kernel=names[i], grid=kernels[i]["args"].get("grid"), dur=kernels[i]["dur"],
                 path=on_path[i]) for i in range(start)]
    tail = [dict(kernel=names[i], grid=kernels[i]["args"].get("grid"), dur=kernels[i]["dur"],
                 path=on_path[i]) for i in range(start + period * layers, len(kernels))]
    parts = layer_bytes(config, context)
    layer_floor = sum(parts.values()) / read_bw * 1e6
    head_bytes = 2 * config.vocab_size * config.hidden_size
    floor_us = layers * layer_floor + head_bytes / read_bw * 1e6
    span = ends[-1] - kernels[0]["ts"]
    print(f"\n{shape}, batch 1, context {context}: replay {replay_us:.1f} us (profiled span "
          f"{span:.1f}); read floor {floor_us:.1f} us ({floor_us / replay_us:.0%} of it); "
          f"{len(kernels)} kernels, {period} a layer")
    print(f"  a layer's floor {layer_floor:.1f} us: " + ", ".join(
        f"{k} {v / read_bw * 1e6:.1f}" for k, v in parts.items()))
    print(f"  {'kernel':46s} {'grid':>14s} {'dur us':>8s} {'on path':>8s}")
    for r in head:
        print(f"  {'(before) ' + r['kernel']:46s} {str(r['grid']):>14s} {r['dur']:8.1f} "
              f"{r['path']:8.1f}")
    for r in rows:
        print(f"  {r['kernel']:46s} {str(r['grid']):>14s} {r['dur']:8.1f} {r['path']:8.1f}")
    layer_path = sum(r["path"] for r in rows)
    print(f"  {'a layer on the path':46s} {'':>14s} {'':>8s} {layer_path:8.1f}  "
          f"(floor {layer_floor:.1f}: {layer_path - layer_floor:+.1f})")
    for r in tail:
        print(f"  {'(after) ' + r['kernel']:46s} {str(r['grid']):>14s} {r['dur']:8.1f} "
              f"{r['path']:8.1f}")
    return dict(shape=shape, context=context, replay_us=replay_us, floor_us=floor_us,
                layer=rows, head=head, tail=tail, layer_floor_us=layer_floor)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama3-8b,qwen2.5-7b")
    p.add_argument("--context", type=int, default=160)
    p.add_argument("--json")
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    read_bw = measure_ceilings()["read_bytes_per_s"]
    torch.cuda.empty_cache()
    print(f"read bandwidth {read_bw / 1e12:.2f} TB/s")
    results = [timeline(s, args.context, read_bw) for s in args.shapes.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
