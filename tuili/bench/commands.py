"""The `tuili bench` commands (throughput, latency, op, serve): flags and what they run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuili.bench.serve import add_bench_options
from tuili.options import add_engine_options, engine_options, positive


def add_bench_parser(sub) -> None:
    """Add `tuili bench` and its subcommands."""
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, op embedding, serve")
    kinds = bench.add_subparsers(dest="bench", required=True)

    tp = kinds.add_parser("throughput", help="offline throughput: all prompts at once")
    tp.add_argument("--num-prompts", type=positive, default=32)
    tp.add_argument("--input-len", type=positive, default=128)
    tp.add_argument("--output-len", type=positive, default=64)
    _add_common(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    lat = kinds.add_parser("latency", help="time to first token and per output token")
    lat.add_argument("--batch-size", type=positive, default=1)
    lat.add_argument("--input-len", type=positive, default=128)
    lat.add_argument("--output-len", type=positive, default=32)
    lat.add_argument("--iters", type=positive, default=3)
    _add_common(lat)
    lat.set_defaults(func=cmd_bench_latency)

    op = kinds.add_parser("op", help="operator microbenchmarks")
    op.add_argument("name", choices=["embedding"])
    op.add_argument("--tokens", default="1,4,64,1024,16384",
                    help="comma-separated token counts to look up")
    op.add_argument("--vocab", type=positive, default=32000)
    op.add_argument("--hidden", type=positive, default=4096)
    op.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    op.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    op.add_argument("--repeats", type=positive, default=10)
    op.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")
    op.add_argument("--output", default=None, help="write the results as JSON")
    op.set_defaults(func=cmd_bench_op)

    serve = kinds.add_parser("serve", help="load an OpenAI-compatible server; report "
                                           "TTFT/TPOT/ITL/E2E, throughput and goodput")
    add_bench_options(serve)
    serve.set_defaults(func=cmd_bench_serve)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--output", default=None, help="write the results (and profile) as JSON")
    p.add_argument("--plot", default=None, help="with --profile: a PNG of time per phase")
    add_engine_options(p)


def _llm(args: argparse.Namespace):
    from tuili.bench.offline import warm_up
    from tuili.entry import LLM

    llm = LLM(**engine_options(args))
    warm_up(llm)
    return llm


def _finish(args: argparse.Namespace, llm, results: dict, lines: list[str]) -> None:
    spec = llm.engine.spec_stats
    if spec is not None:
        results["speculative"] = spec.summary()
        lines.append(spec.format())
    profiler = llm.engine.profiler
    if profiler is not None:
        results["profile"] = profiler.summary()
        lines += ["", profiler.format()]
        if args.plot:
            from tuili.analysis.plots import plot_phase_times

            phases = {p: {"roofline floor": s["floor_s"], "above the floor": s["seconds"] - s["floor_s"]}
                      for p, s in results["profile"].items()}
            path = plot_phase_times(phases, args.plot, f"time per phase, {profiler.device.name}")
            lines.append(f"wrote {path}")
    elif args.plot:
        lines.append("--plot needs --profile; no plot written")
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from tuili.bench.offline import throughput

    llm = _llm(args)
    r = throughput(llm, args.num_prompts, args.input_len, args.output_len, args.prompt_seed)
    lines = [f"throughput: {r['requests']} requests of {args.input_len} prompt + {args.output_len} "
             f"output tokens in {r['seconds']:.2f} s: {r['requests_per_s']:.2f} req/s, "
             f"{r['output_tokens_per_s']:.1f} output tok/s, {r['total_tokens_per_s']:.1f} total tok/s"]
    _finish(args, llm, r, lines)


def cmd_bench_latency(args: argparse.Namespace) -> None:
    from tuili.bench.offline import latency

    llm = _llm(args)
    r = latency(llm, args.batch_size, args.input_len, args.output_len, args.iters, args.prompt_seed)
    lines = [f"latency: batch {r['batch']}, {args.input_len} prompt + {args.output_len} output "
             f"tokens, {r['iters']} runs: TTFT {r['ttft_s'] * 1e3:.1f} ms, TPOT "
             f"{r['tpot_s'] * 1e3:.2f} ms ({r['output_tokens_per_s']:.1f} tok/s), end to end "
             f"{r['e2e_s']:.2f} s"]
    _finish(args, llm, r, lines)


def cmd_bench_op(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from tuili.bench.offline import TORCH_DTYPES, embedding_lookup, format_lookups, pick_device
    from tuili.analysis.measure import copy_bandwidth
    from tuili.errors import InvalidParameter

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        raise InvalidParameter("tokens", f"got {args.tokens!r}, must be comma-separated integers") from None
    results = embedding_lookup(tokens, args.vocab, args.hidden, args.dtype, args.device,
                               args.repeats)
    dev = pick_device(args.device)
    peak = copy_bandwidth(dev)
    item = TORCH_DTYPES[args.dtype].itemsize
    print(f"embedding lookup: [{args.vocab:,} x {args.hidden:,}] {args.dtype} table "
          f"({args.vocab * args.hidden * item / 2**20:.0f} MiB) on {dev}; copy bandwidth here "
          f"{peak / 1e9:.1f} GB/s\nbytes moved = rows read (tokens x {args.hidden} x {item} B) + "
          "ids + rows written")
    print(format_lookups(results, peak))
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype, "device": str(dev),
             "copy_bandwidth": peak,
             "results": [asdict(r) | {"bandwidth": r.bandwidth} for r in results]}, indent=2) + "\n")
        print(f"wrote {args.output}")


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from tuili.bench.serve import run_from_args

    run_from_args(args)
