"""What the router costs and what a second worker gives: the same streaming workload straight to
one `tuili serve` worker, through `tuili router` to that worker, and through the router to two
workers, in alternating rounds (best of each). Targets (issue 24): <= 2 ms added to the median
TTFT, throughput within 3% through the router.

    python benchmarks/router_overhead.py [--clients 32] [--num-prompts 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_vs_offline import start_server  # noqa: E402
from tuili.bench.serve import BenchConfig, run_benchmark, wait_until_healthy  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(workers: list[str], tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / f"router-{port}.yaml"
    config.write_text("models:\n  smol:\n    workers: [" + ", ".join(workers) + "]\n")
    proc = subprocess.Popen([sys.executable, "-m", "tuili", "router", "--config", str(config),
                             "--port", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 60, proc)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-threads", type=int, default=1, help="per worker")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    options = {"model": args.model, "num_threads": args.num_threads,
               "served_model_name": "smol", "max_num_seqs": args.clients}
    ports = [free_port(), free_port()]
    workers = [start_server(options, p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = list(workers)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            one, one_url = start_router(urls[:1], Path(tmp))
            two, two_url = start_router(urls, Path(tmp))
            procs += [one, two]
            arms = {"straight to one worker": urls[0], "router, one worker": one_url,
                    "router, two workers": two_url}
            cfg = dict(model="smol", num_prompts=args.num_prompts, input_len=args.input_len,
                       output_len=args.output_len, ignore_eos=True, temperature=0.0,
                       max_concurrency=args.clients)
            for url in arms.values():  # warm-up
                asyncio.run(run_benchmark(BenchConfig(**{**cfg, "num_prompts": 8}, base_url=url)))
            results: dict[str, list[dict]] = {arm: [] for arm in arms}
            for rnd in range(args.rounds):
                for arm, url in arms.items():
                    r = asyncio.run(run_benchmark(BenchConfig(**cfg, base_url=url, seed=rnd)))
                    results[arm].append(r)
                    print(f"round {rnd} {arm}: TTFT p50 {r['ttft_ms']['p50']:.1f} ms, "
                          f"{r['output_throughput']:.1f} tok/s", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    best = {arm: max(rs, key=lambda r: r["output_throughput"]) for arm, rs in results.items()}
    base = best["straight to one worker"]
    print(f"\n{args.num_prompts} requests ({args.input_len} in, {args.output_len} out), "
          f"{args.clients} at once, best of {args.rounds}")
    print(f"{'arm':<24}{'TTFT p50 ms':>12}{'TTFT p99 ms':>12}{'tok/s':>10}{'vs straight':>12}")
    for arm, r in best.items():
        print(f"{arm:<24}{r['ttft_ms']['p50']:>12.1f}{r['ttft_ms']['p99']:>12.1f}"
              f"{r['output_throughput']:>10.1f}"
              f"{r['output_throughput'] / base['output_throughput']:>11.3f}x")
    added = best["router, one worker"]["ttft_ms"]["p50"] - base["ttft_ms"]["p50"]
    print(f"router adds {added:.1f} ms to the median TTFT (target <= 2)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TUILI_LOG_LEVEL", "WARNING")
    main()
