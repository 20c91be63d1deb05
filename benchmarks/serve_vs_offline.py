"""The server under N concurrent streaming clients vs LLM.generate on the same workload.

Both run the same engine options on the same random token-id prompts (greedy, ignore_eos, so
every request makes exactly --output-len tokens). The server is a real `tuili serve` subprocess
driven by `tuili bench serve`'s load generator; the ratio is server / offline output tokens/s.
Target (issue 4): >= 0.90.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time


from tuili import LLM, SamplingParams
from tuili.bench.serve import (BenchConfig, format_report, make_prompts, run_benchmark,
                               wait_until_healthy)


def offline(llm: LLM, prompts: list, output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(o.num_generated_tokens for o in outs)
    print(f"offline: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tok/s")
    return tokens / elapsed


def start_server(options: dict, port: int) -> subprocess.Popen:
    flags = []
    for name, value in options.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen([sys.executable, "-m", "tuili", "serve", "--port", str(port),
                             "--max-waiting", "100000", *flags], stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", 120, proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternate offline/server; best of each")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    options = {"model": args.model, "max_num_seqs": args.clients, "num_threads": args.num_threads}
    cfg = BenchConfig(num_prompts=args.clients, input_len=args.input_len,
                      output_len=args.output_len, ignore_eos=True, temperature=0.0,
                      max_concurrency=args.clients)
    prompts = make_prompts(cfg)
    llm = LLM(**options)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4))  # warm-up

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(options, port)
    offline_runs, server_runs = [], []
    try:
        cfg.base_url = f"http://127.0.0.1:{port}"
        warm = BenchConfig(**{**cfg.__dict__, "num_prompts": 8, "max_concurrency": 8})
        asyncio.run(run_benchmark(warm))
        # Alternate, so that a noisy neighbour on the shared cores hits both sides alike.
        for _ in range(args.rounds):
            offline_runs.append(offline(llm, prompts, args.output_len))
            server_runs.append(asyncio.run(run_benchmark(cfg)))
            print(f"server: {server_runs[-1]['output_throughput']:.1f} tok/s")
    finally:
        server.terminate()
        server.wait(60)
    offline_tps = max(offline_runs)
    summary = max(server_runs, key=lambda r: r["output_throughput"])
    print(format_report(summary))
    ratio = summary["output_throughput"] / offline_tps
    print(f"server {summary['output_throughput']:.1f} tok/s / offline {offline_tps:.1f} tok/s "
          f"= {ratio:.3f} (target >= 0.90)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"offline_tok_s": offline_runs, "server_tok_s": [r["output_throughput"]
                       for r in server_runs], "best_server": summary, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TUILI_LOG_LEVEL", "WARNING")
    main()
