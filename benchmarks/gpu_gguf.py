"""GGUF blocks on the GPU: batch-1 decode ms/token of a Llama-3.1-8B-shaped random GGUF with its
layers in Q4_K and in Q8_0 (blocks kept packed, the default), beside the Q8_0 file's weights
dequantized to bf16 (quantization none), each beside its read floor (the layers' stored bytes +
the bf16 LM head at 4.18 TB/s). --sweep instead times the GEMV alone on the 8B layer shapes over
tile shapes (graph replays), with its share of the read bandwidth; past 8 rows the tiled GEMM's
tiles and dequantize + cuBLAS, beside bf16's cuBLAS.

    python3 benchmarks/gpu_gguf.py [--arms q4_k,q8_0,bf16] [--layers 32] [--dir /tmp/gguf8b]
    python3 benchmarks/gpu_gguf.py --sweep [--types Q4_K,Q8_0] [--rows 1,16,64]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from tests.gguf_models import random_blocks, write_llama_gguf  # noqa: E402

READ = 4.18e12  # H200 read bandwidth, bytes/s (BENCHMARKS.md)
SHAPE = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
LAYER_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                "down": (4096, 14336)}
NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gguf_file(folder: Path, qtype: str, layers: int) -> Path:
    path = folder / f"llama8b-{qtype.lower()}-{layers}l.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        write_llama_gguf(path, SHAPE["hidden"], SHAPE["intermediate"], layers, SHAPE["heads"],
                         SHAPE["kv_heads"], {n: qtype for n in NAMES}, head_type="F16",
                         vocab=SHAPE["vocab"], embed_type="F16")
    return path


def decode(folder: Path, arms: list[str], layers: int) -> None:
    from benchmarks.gpu_workloads import tuili_decode_ms
    from tuili import LLM, SamplingParams
    from tuili.kernels.reference_gguf import bits_per_weight

    h, i, kv = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["kv_heads"] * 128
    weights = layers * (h * (h + 2 * kv) + h * h + 3 * h * i)
    head = SHAPE["vocab"] * h * 2
    prompt = [random.Random(0).randrange(300, SHAPE["vocab"]) for _ in range(128)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rows, base = [], None
    for arm in arms:
        qtype = "Q8_0" if arm == "bf16" else arm.upper()
        path = gguf_file(folder, qtype, layers)
        bits = 16 if arm == "bf16" else bits_per_weight(qtype)
        llm = LLM(str(path), dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=1024,
                  gpu_memory_utilization=0.5, quantization="none" if arm == "bf16" else "gguf")
        ms = min(tuili_decode_ms(llm, prompt) for _ in range(2))
        tokens = list(llm.generate([prompt], greedy)[0].outputs[0].token_ids)
        base = base or tokens
        agree = sum(a == b for a, b in zip(tokens, base)) / len(base)
        floor = (weights * bits / 8 + head) / READ * 1e3
        rows.append((arm, bits, ms, floor, agree))
        print(f"{arm}: {ms:.3f} ms/token (floor {floor:.2f} ms), greedy agreement with "
              f"{arms[0]} {agree:.2f}", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\nLlama-3.1-8B shape, {layers} layers, batch 1, ~130 context")
    print(f"{'weights':<8}{'bits/w':>8}{'ms/token':>10}{'floor ms':>10}{'floor/ms':>10}{'agree':>8}")
    for arm, bits, ms, floor, agree in rows:
        print(f"{arm:<8}{bits:>8.3f}{ms:>10.3f}{floor:>10.2f}{floor / ms:>10.2f}{agree:>8.2f}")


def sweep(types: list[str], m: int) -> None:
    from tuili.kernels import triton_gguf
    from tuili.kernels.reference_gguf import planes_from_blocks

    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    x_by_k = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _, k in LAYER_SHAPES.values()}
    print(f"{'type':<6}{'layer':<9}{'tile':>14}{'us':>9}{'GB/s':>8}{'of read':>9}")
    for qtype in types:
        lanes, halves = triton_gguf.PIECES[qtype]
        for name, (n, k) in LAYER_SHAPES.items():
            planes = planes_from_blocks(torch.from_numpy(random_blocks(qtype, n, k, rng)),
                                        qtype, k).to(dev)
            x = x_by_k[k]
            best = None
            for tile, fn in tiles(triton_gguf, x, planes, lanes * halves):
                try:
                    s = cuda_time(fn, graph=True)
                except Exception as e:  # a tile the compiler refuses (registers, shared)
                    print(f"{qtype:<6}{name:<9}{tile:>14} failed: {type(e).__name__}")
                    continue
                gbs = planes.nbytes / s / 1e9
                best = min(best or (s, tile), (s, tile))
                print(f"{qtype:<6}{name:<9}{tile:>14}{s * 1e6:>9.1f}{gbs:>8.0f}"
                      f"{gbs * 1e9 / READ:>9.0%}", flush=True)
            s, tile = best
            print(f"best {qtype} {name}: {tile}, {s * 1e6:.1f} us "
                  f"({planes.nbytes / s / READ:.0%} of read)")
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            s16 = cuda_time(lambda: torch.nn.functional.linear(x, w), graph=True)
            print(f"  bf16 {name}: {s16 * 1e6:.1f} us; packed / bf16 time {s / s16:.2f}")
            del planes, w
            torch.cuda.empty_cache()


def tiles(kernels, x, planes, piece):
    """(label, timed call) per tile: the GEMV's at decode rows (block_n x span of K), else the
    tiled GEMM's (block_m x block_n x span) and dequantize + cuBLAS."""
    if x.shape[0] <= kernels.MAX_ROWS:
        for block_n in (4, 8, 16, 32):
            for span in (64, 128, 256, 512):
                if span >= piece:
                    yield f"{block_n} x {span}", lambda b=block_n, p=span // piece: \
                        kernels.gguf_gemv(x, planes, None, None, b, p)
        return
    for block_m in (16, 32, 64, 128):
        for block_n in (32, 64, 128):
            for span in (32, 64, 128):
                if span >= piece:
                    yield f"{block_m}x{block_n}x{span}", \
                        lambda bm=block_m, bn=block_n, sp=span: kernels.gguf_gemm(
                            x, planes, None, None, bm, bn, sp)
    yield "dequant+cuBLAS", lambda: torch.nn.functional.linear(
        x, kernels.gguf_dequantize(planes, x.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="q4_k,q8_0,bf16")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dir", default="/tmp/gguf8b", help="where the GGUF files are (re)used")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--types", default="Q4_K,Q8_0")
    p.add_argument("--rows", default="1", help="rows of x, comma-separated (e.g. 1,16,64)")
    args = p.parse_args()
    if args.sweep:
        for rows in map(int, args.rows.split(",")):
            print(f"\n{rows} rows")
            sweep(args.types.split(","), rows)
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    decode(folder, args.arms.split(","), args.layers)


if __name__ == "__main__":
    main()
