"""Tensor parallelism on the CPU: SmolLM2-135M's step times at TP=1 and TP=3 (gloo), and what
gloo's collectives cost alone at the model's shapes, so the TP=3 step reads as compute / 3 plus
communication.

Steps timed through the engine (LLM.generate, wall clock, median of --repeat): a 256-token
prefill (the first token of a fresh prompt: no prefix-cache hit), decode at batch 1 and 8 (the
time of N more tokens over N). Collectives timed in 3 gloo processes alone: the all-reduce of
[rows, 576] floats that each row-parallel layer (o_proj, down: two a layer) and the embedding do,
and the LM head's all-gather of [rows, 49152 / 3]. TP=1 uses every core; TP=3's ranks share them
(cores / 3 threads each, as the engine does).

    python benchmarks/cpu_tensor_parallel.py [--dtype float32] [--decode-tokens 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.router_overhead import pick_model  # noqa: E402

HIDDEN, VOCAB, LAYERS = 576, 49152, 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_worker(rank: int, size: int, port: int, rows: list[int], iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    # torch 2.13 renamed it (the old name warns); 2.11 has only the old one.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    result = {}
    for n in rows:
        x = torch.randn(n, HIDDEN)
        shard = torch.randn(n, VOCAB // size)
        gathered = torch.empty(size * n, VOCAB // size)
        for name, op in (("all_reduce", lambda: dist.all_reduce(x)),
                         ("all_gather", lambda: all_gather(gathered, shard))):
            for _ in range(5):
                op()
            times = []
            for _ in range(iters if n <= 8 else max(10, iters // 10)):
                dist.barrier()
                t = time.perf_counter()
                op()
                times.append(time.perf_counter() - t)
            result[(name, n)] = statistics.median(times)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def time_collectives(size: int, rows: list[int], iters: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=collective_worker, args=(r, size, port, rows, iters, out))
             for r in range(size)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return result


def time_steps(tp: int, args) -> dict:
    from tuili import LLM
    from tuili.sampling_params import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, tensor_parallel_size=tp, max_num_seqs=16)
    rng = random.Random(tp)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(1000, 20000) for _ in range(length)] for _ in range(n)]

    def wall(batch: list[list[int]], tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(batch, params)
        return time.perf_counter() - t

    wall(prompts(8, 16), 4)  # warm-up
    out = {f"prefill {args.prefill_len}": statistics.median(wall(prompts(1, args.prefill_len), 1)
                                            for _ in range(args.repeat))}
    n = args.decode_tokens
    for b in (1, 8):
        out[f"decode batch {b}"] = statistics.median(
            (wall(prompts(b, 16), n + 1) - wall(prompts(b, 16), 1)) / n
            for _ in range(args.repeat))
    if tp > 1:
        llm.engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto",
                    help="a model tuili loads, 'random' (SmolLM2's shape, random weights, built "
                         "offline) or 'auto' (smollm2-135m if its package is installed)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iters", type=int, default=200, help="collective timings per shape")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.model = pick_model(args.model, Path(tmp))
        run(args)


def run(args) -> None:
    rows = {f"prefill {args.prefill_len}": args.prefill_len, "decode batch 1": 1, "decode batch 8": 8}
    comm = time_collectives(args.tp, sorted(set(rows.values())), args.iters)
    one = time_steps(1, args)
    many = time_steps(args.tp, args)
    print(f"\nSmolLM2-135M ({args.model}) {args.dtype} on {os.cpu_count()} cores; TP={args.tp} over gloo. "
          f"Per step: {2 * LAYERS} row-parallel all-reduces + 1 embedding all-reduce of "
          f"[rows, {HIDDEN}], 1 LM-head all-gather of [rows, {VOCAB // args.tp}]")
    print(f"{'step':<16}{'TP=1 ms':>9}{f'TP={args.tp} ms':>9}{'speed-up':>9}"
          f"{'all-reduce us':>15}{'a layer us':>12}{'all-gather us':>15}{'comm/step ms':>14}")
    for step, n in rows.items():
        ar, ag = comm[("all_reduce", n)], comm[("all_gather", n)]
        per_step = (2 * LAYERS + 1) * ar + ag
        print(f"{step:<16}{one[step] * 1e3:>9.2f}{many[step] * 1e3:>9.2f}"
              f"{one[step] / many[step]:>8.2f}x{ar * 1e6:>15.1f}{2 * ar * 1e6:>12.1f}"
              f"{ag * 1e6:>15.1f}{per_step * 1e3:>14.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TUILI_LOG_LEVEL", "WARNING")
    main()
