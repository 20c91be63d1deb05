"""The server at engine speed on the GPU: `tuili serve` on a random-weight model of a real shape,
driven by `tuili bench serve` (streaming, ignore_eos), beside LLM.generate on the same requests.

Cases: all requests at once (server wall time over offline wall time) and Poisson arrivals at
each --rates value (TTFT and TPOT percentiles), those first, on the server as it comes up; all of
it once per --engine value (the engine in a process of its own, the GPU default, or in a thread
of the server's process). The server runs under benchmarks/serve_probe.py, which logs Triton
compilations after start-up and engine steps slower than --slow-step-ms (in the engine's process,
wherever that is); with --py-spy, py-spy samples which thread of either process holds its GIL
during the all-at-once run.

    python3 benchmarks/gpu_serve.py [--shape llama3-8b] [--rates 8,24] [--engine process,thread]
                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gpu_workloads import FULL_LAYERS  # noqa: E402
from tests.gpu.random_models import build, word_tokenizer  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.bench.serve import (BenchConfig, make_prompts, run_benchmark,  # noqa: E402
                               wait_until_healthy)


def offline_wall(folder: str, prompts: list, output_len: int) -> float:
    llm = LLM(folder, dtype="bfloat16", device="cuda")
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    warm = make_prompts(BenchConfig(num_prompts=8, input_len=len(prompts[0]), seed=99))
    llm.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return wall


def start_server(folder: str, port: int, probe_log: Path, slow_ms: float,
                 engine: str) -> subprocess.Popen:
    env = {**os.environ, "TUILI_PROBE_LOG": str(probe_log), "TUILI_PROBE_SLOW_MS": str(slow_ms)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "serve_probe.py"), "serve",
                             "--model", folder, "--port", str(port), "--dtype", "bfloat16",
                             "--max-waiting", "100000",
                             "--engine-process" if engine == "process" else "--no-engine-process"],
                            env=env)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", 600, proc)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not found: no GIL profile")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "200", "--gil", "--threads", "--subprocesses", "--format", "raw",
                             "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gil_shares(raw: Path, top: int = 15) -> tuple[dict, list]:
    """Share of the GIL-holding samples per thread (py-spy --threads --gil samples only the
    thread that holds it), each thread named by its outermost tuili or uvicorn frame, and the
    heaviest two-frame leaves."""
    threads, names, leaves = Counter(), {}, Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        tid = frames[0]
        threads[tid] += int(count)
        if tid not in names:
            names[tid] = next((f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")")
                               for f in frames[1:] if "tuili" in f or "uvicorn" in f), tid)
        leaves[";".join(f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")")
                        for f in frames[-2:])] += int(count)
    total = sum(threads.values()) or 1
    return ({names[t]: round(c / total, 3) for t, c in threads.most_common()},
            [(f, round(c / total, 3)) for f, c in leaves.most_common(top)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--rates", default="8,24")
    p.add_argument("--slow-step-ms", type=float, default=50.0)
    p.add_argument("--engine", default="process,thread",
                   help="where the server's engine runs, each in a run of its own")
    p.add_argument("--py-spy", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    cfg = BenchConfig(num_prompts=args.num_prompts, input_len=args.input_len,
                      output_len=args.output_len, ignore_eos=True, temperature=0.0)
    prompts = make_prompts(cfg)
    results: dict = {"shape": args.shape}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        hf = build(args.shape, Path(tmp), num_layers=FULL_LAYERS[args.shape])
        # Every id decodes to text, so each streamed token is a chunk the client times.
        word_tokenizer(hf.config.vocab_size).save(str(Path(tmp) / "tokenizer.json"))
        del hf
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{args.shape}: built in {time.perf_counter() - start:.0f}s", flush=True)
        results["offline_s"] = offline_wall(tmp, prompts, args.output_len)
        print(f"offline: {results['offline_s']:.2f} s", flush=True)
        args.offline_s = results["offline_s"]

        for engine in args.engine.split(","):
            results[engine] = serve_runs(tmp, cfg, args, out_dir, engine)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def serve_runs(folder: str, cfg: BenchConfig, args, out_dir: Path, engine: str) -> dict:
    """The Poisson runs and the burst against one freshly started server."""
    results: dict = {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe_log = out_dir / f"serve_probe_{engine}.jsonl"
    server = start_server(folder, port, probe_log, args.slow_step_ms, engine)
    started = time.time()  # the server is up: any compilation from here on waits a user
    try:
        cfg.base_url = f"http://127.0.0.1:{port}"
        # The Poisson runs first, on the server as it comes up (no warm-up requests): its
        # first requests meet whatever start-up left to compile.
        # Each run has prompts of its own (seed): none finds another's in the prefix cache.
        for seed, rate in enumerate((float(r) for r in args.rates.split(",") if r), 1):
            run = asyncio.run(run_benchmark(BenchConfig(**{**cfg.__dict__, "seed": seed,
                                                           "request_rate": rate})))
            results[f"rate_{rate:g}"] = run
            print(f"{engine}: server at {rate:g} req/s: TTFT p50 {run['ttft_ms']['p50']:.1f} p99 "
                  f"{run['ttft_ms']['p99']:.1f} ms, TPOT p50 {run['tpot_ms']['p50']:.2f} ms, "
                  f"failed {run['failed']}", flush=True)
        spy = py_spy(server.pid, 1.2 * args.offline_s, out_dir / f"gil_{engine}.txt") \
            if args.py_spy else None
        burst = asyncio.run(run_benchmark(cfg))
        if spy is not None:
            spy.wait(60)
            threads, leaves = gil_shares(out_dir / f"gil_{engine}.txt")
            results.update(gil_threads=threads, gil_leaves=leaves)
        results["at_once"] = burst
        print(f"{engine}: server, all at once: {burst['duration_s']:.2f} s, "
              f"{burst['completed']} completed, {burst['failed']} failed", flush=True)
    finally:
        server.terminate()
        server.wait(120)
    events = [json.loads(ln) for ln in probe_log.read_text().splitlines()] \
        if probe_log.exists() else []
    late = [e for e in events if e.get("t", 0) >= started]
    results["compiles_after_ready"] = [e for e in late if e["kind"] == "compile"]
    results["slow_steps"] = [e for e in late if e["kind"] == "step"]
    return results


def report(r: dict, args) -> None:
    print(f"\n{r['shape']}, {args.num_prompts} x ({args.input_len} in, {args.output_len} out), "
          "greedy, ignore_eos")
    print(f"{'case':<44} {'wall s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'TPOT p99':>9}")
    print(f"{'offline (LLM.generate)':<44} {r['offline_s']:8.2f}")
    engines = args.engine.split(",")
    for engine in engines:
        runs = r[engine]
        rows = [("server, all at once", runs["at_once"])] + [
            (f"server, {k[5:]} req/s Poisson", v) for k, v in runs.items() if k.startswith("rate_")]
        for name, s in rows:
            print(f"{name + ', engine in a ' + engine:<44} {s['duration_s']:8.2f} "
                  f"{s['ttft_ms']['p50']:9.1f} {s['ttft_ms']['p99']:9.1f} "
                  f"{s['tpot_ms']['p50']:9.2f} {s['tpot_ms']['p99']:9.2f}")
    for engine in engines:
        runs = r[engine]
        print(f"\nengine in a {engine}: server / offline, all at once: "
              f"{r['offline_s'] / runs['at_once']['duration_s']:.3f} (output rate ratio; target >= 0.95)")
        late = runs["compiles_after_ready"]
        print(f"Triton kernels compiled or loaded after the server was up: "
              f"{len(late)} {sorted({c['name'] for c in late})}")
        slow = runs["slow_steps"]
        print(f"engine steps over {args.slow_step_ms:g} ms after the server was up: {len(slow)}"
              + "".join(f"\n  {s}" for s in slow[:8]))
        if "gil_threads" in runs:
            print(f"GIL held, by thread: {runs['gil_threads']}")
            for f, share in runs["gil_leaves"]:
                print(f"  {share:6.1%}  {f}")


if __name__ == "__main__":
    main()
