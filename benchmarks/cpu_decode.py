"""CPU decode speed on SmolLM2-135M-Instruct (Q4_1 GGUF): tuili beside HF transformers and llama.cpp.

Run: python benchmarks/cpu_decode.py [--engines tuili,hf,llamacpp] [--dtypes float32,bfloat16]
                                      [--bf16-quantizations none,auto] [--tokens 128]
                                      [--streams 32] [--repeats 2] [--llamacpp-python PATH]
                                      [--json OUT]

What is measured (greedy, end-of-sequence ignored, --tokens N new tokens, torch on --threads threads):

- single stream, decode only: one short prompt; rate = (N - 1) / (time from the first new token
  to the last), so prefill and the first token are not counted.
  * tuili: LLM("smollm2-135m", dtype=..., quantization=...): float32 and bfloat16 with every weight
    dequantized (quantization="none"), and bfloat16 with the default quantization="auto", which on
    CPU keeps the GGUF's 4-bit weights packed for the int4 kernel ("bfloat16+int4"); timed over
    llm.stream().
  * HF transformers: AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=...) (weights
    dequantized to dtype); a bare loop of model(input_ids, past_key_values, use_cache=True) + argmax
    under torch.inference_mode, one token per step; only the N - 1 decode steps are timed.
  * llama.cpp (llama-cpp-python): the GGUF itself (Q4_1 kernels), n_threads=--threads, greedy
    Llama.generate(temp=0), which never stops on EOS by itself; run once, its dtype is the GGUF's.
    In this process, or with --llamacpp-python in that interpreter (benchmarks/cpu_llamacpp.py:
    a venv of its own). With tuili in the same run, llama.cpp stays loaded and its timed runs
    alternate with those of tuili's default path (bfloat16 + packed int4), so both see the same
    load; their ratio is checked against issue 22's target (>= 1.1x llama.cpp).
- N streams (tuili only): --streams different prompts through one llm.generate(prompts, params);
  rate = all generated tokens / wall time (prefill included). --streams 0 skips it.

Every case gets a warm-up run, then the best of --repeats timed runs (the machine is noisy).
The ratio column is each rate over HF's float32 single-stream rate; the targets checked at the end
are tuili single stream >= 1.8x and tuili N streams >= 10x that rate. The "cpu ms/tok" column
(single streams timed here) is the process's CPU time per decoded token: steadier than the rate
on a shared machine at --threads 1 (at 2 threads it also counts the threads' spin-waits).
Last, each tuili single stream's roofline share: the weight bytes its decode step reads (packed
int4 and scales, the int8 head: as held) times its rate, over a 1 GiB reduction/copy run then.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_llamacpp import PROMPT, open_llamacpp  # noqa: E402

TOPICS = ("a lighthouse keeper", "a lost kitten", "a time traveller", "a dragon", "a baker",
          "a haunted house", "a space station", "a pirate ship", "a detective", "a wizard's apprentice",
          "a desert caravan", "a city under the sea", "a talking tree", "a chess champion",
          "a mountain village", "a violin maker", "a secret garden", "a train at midnight",
          "a robot gardener", "an old map", "a volcano island", "a clockmaker", "a snowstorm",
          "a circus", "a forgotten library", "a river journey", "a knight", "a bee colony",
          "a midnight market", "a comet", "a small fox", "a glass castle")
SINGLE_TARGET, STREAMS_TARGET = 1.8, 10.0  # tuili over HF float32 single stream
LLAMACPP_TARGET = 1.1  # tuili's default path over llama.cpp, single stream (issue 22)


@dataclass
class Result:
    engine: str
    dtype: str
    case: str
    tok_s: float
    ratio: float | None = None  # over HF float32 single stream
    cpu_ms: float | None = None  # CPU ms per decoded token of the best run (single streams)
    mb_per_token: float | None = None  # weight bytes a single-stream decode step reads (tuili)


def best_of(run: Callable[[], float], repeats: int) -> float:
    """One warm-up run, then the best rate of `repeats` timed runs."""
    run()
    return max(run() for _ in range(repeats))


def best_pair(runs: list[Callable[[], tuple[float, float]]], repeats: int
              ) -> list[tuple[float, float]]:
    """A warm-up of each, then `repeats` rounds running each once in turn; per run, the best
    (tok/s, CPU ms per token) by rate."""
    for run in runs:
        run()
    best = [(0.0, 0.0)] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            best[i] = max(best[i], run())
    return best


def stream_prompts(count: int) -> list[str]:
    return [f"Write a story about {TOPICS[i % len(TOPICS)]}"
            + (f" (story {i // len(TOPICS) + 1})" if i >= len(TOPICS) else "") + "."
            for i in range(count)]


# ---- tuili ------------------------------------------------------------------------------------

def tuili_params(tokens: int):
    from tuili import SamplingParams

    return SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)


def tuili_single(llm, tokens: int) -> float:
    """Decode rate of one stream: tokens after the first over the time from the first to the last."""
    return tuili_single_cpu(llm, tokens)[0]


def tuili_single_cpu(llm, tokens: int) -> tuple[float, float]:
    """(tuili_single's rate, CPU ms per token over the same span)."""
    first: tuple[float, int, float] | None = None
    last: tuple[float, int, float] = (0.0, 0, 0.0)
    for out in llm.stream(PROMPT, tuili_params(tokens)):
        now, count = time.perf_counter(), len(out.outputs[0].token_ids)
        last = (now, count, time.process_time())
        if count and first is None:
            first = last
    assert first is not None and last[1] == tokens, f"tuili gave {last[1]} tokens, wanted {tokens}"
    n = last[1] - first[1]
    return n / (last[0] - first[0]), (last[2] - first[2]) / n * 1e3


def tuili_streams(llm, tokens: int, streams: int) -> float:
    """Batch throughput: all generated tokens over the wall time of one generate() call."""
    prompts = stream_prompts(streams)
    start = time.perf_counter()
    outs = llm.generate(prompts, tuili_params(tokens))
    elapsed = time.perf_counter() - start
    total = sum(o.num_generated_tokens for o in outs)
    assert total == tokens * streams, f"tuili gave {total} tokens, wanted {tokens * streams}"
    return total / elapsed


def decode_weight_bytes(model) -> int:
    """The weight bytes one single-stream decode step reads: each Linear as its decode path
    holds it (packed int4 with scales, the int8 head, else the float weight); the embedding
    lookup reads one row."""
    from tuili.layers.linear import Int4CpuMethod, Linear

    try:
        from tuili.quantization.int8 import Int8HeadMethod
    except ImportError:  # a tree from before the int8 head (an A/B run of two trees)
        Int8HeadMethod = type(None)
    total = 0
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
        held = getattr(m.method, "tensors", None)  # trees before 2026-12-08: packed, q
        if held is None and isinstance(m.method, Int4CpuMethod):
            held = (m.method.packed, m.method.scales_zeros)
        elif held is None and isinstance(m.method, Int8HeadMethod):
            held = (m.method.q, m.method.scale)
        if held is not None:
            total += sum(t.nbytes for t in held)
        else:
            total += m.weight.nbytes
    return total


def bench_tuili(dtype: str, quantization: str, args: argparse.Namespace,
                peer=None) -> list[Result]:
    """tuili's cases in one engine; `peer` (llama.cpp, loaded): its single-stream runs alternate
    with tuili's when this is the default path (bf16 + int4), and its result comes too."""
    from tuili import LLM

    llm = LLM("smollm2-135m", dtype=dtype, quantization=quantization, num_threads=args.threads)
    model = llm.engine.runner.model
    int4 = model.layers[0].mlp.down_proj.method.name == "int4"
    head = model.lm_head.method.name
    label = dtype + ("+int4" if int4 else "") + (f"/{head}" if head != "none" else "")
    runs = [lambda: tuili_single_cpu(llm, args.tokens)]
    if peer is not None and int4:
        runs.append(lambda: peer.run(args.tokens))
    best = best_pair(runs, args.repeats)
    results = [Result("tuili", label, "single", best[0][0], cpu_ms=best[0][1],
                      mb_per_token=decode_weight_bytes(model) / 1e6)]
    if len(best) > 1:
        results.append(Result("llama.cpp", "gguf q4_1", "single", best[1][0],
                              cpu_ms=best[1][1] / (args.tokens - 1) * 1e3))
    if args.streams:
        many = best_of(lambda: tuili_streams(llm, args.tokens, args.streams), args.repeats)
        results.append(Result("tuili", label, f"{args.streams} streams", many))
    return results


# ---- HF transformers --------------------------------------------------------------------------

@torch.inference_mode()
def hf_single(model, prompt_ids: torch.Tensor, tokens: int) -> float:
    out = model(input_ids=prompt_ids, use_cache=True)  # prefill: not timed
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (tokens - 1) / (time.perf_counter() - start)


def bench_hf(dtype: str, gguf: Path, args: argparse.Namespace) -> list[Result]:
    import transformers

    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return [Result("hf", dtype, "single", best_of(lambda: hf_single(model, ids, args.tokens),
                                                   args.repeats))]


# ---- llama.cpp --------------------------------------------------------------------------------

def bench_llamacpp(peer, args: argparse.Namespace) -> list[Result]:
    rate, cpu_s = best_pair([lambda: peer.run(args.tokens)], args.repeats)[0]
    return [Result("llama.cpp", "gguf q4_1", "single", rate,
                   cpu_ms=cpu_s / (args.tokens - 1) * 1e3)]


# ---- driver -----------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> list[Result]:
    from tuili.models.loader import resolve

    gguf = resolve("smollm2-135m")
    dtypes = args.dtypes.split(",")
    engines = args.engines.split(",")
    # llama.cpp stays loaded through the run: tuili's default path alternates with it.
    peer = open_llamacpp(str(gguf), args.threads, args.llamacpp_python) \
        if "llamacpp" in engines else None
    paired = peer is not None and "tuili" in engines and "bfloat16" in dtypes \
        and "auto" in args.bf16_quantizations.split(",")
    benches: list[Callable[[], list[Result]]] = []
    for engine in engines:
        if engine == "tuili":
            # bf16 twice: dequantized only, and with the GGUF's 4-bit weights packed (the default)
            benches += [lambda d=d, q=q: bench_tuili(d, q, args, peer) for d in dtypes
                        for q in (args.bf16_quantizations.split(",") if d == "bfloat16"
                                  else ("none",))]
        elif engine == "hf":
            benches += [lambda d=d: bench_hf(d, gguf, args) for d in dtypes]
        elif engine == "llamacpp":
            if not paired:
                benches.append(lambda: bench_llamacpp(peer, args))
        else:
            raise SystemExit(f"unknown engine {engine!r}: use tuili, hf, llamacpp")
    results: list[Result] = []
    for bench in benches:  # one tuili or HF model in memory at a time
        results += bench()
        gc.collect()
    if peer is not None:
        peer.close()
    return results


def add_ratios(results: list[Result]) -> float | None:
    base = next((r.tok_s for r in results if (r.engine, r.dtype, r.case) == ("hf", "float32", "single")),
                None)
    for r in results:
        r.ratio = r.tok_s / base if base else None
    return base


def print_table(results: list[Result], base: float | None, streams: int) -> None:
    print(f"\n{'engine':<10} {'dtype':<22} {'case':<12} {'tok/s':>9} {'vs HF fp32':>11} "
          f"{'cpu ms/tok':>11}")
    print("-" * 80)
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
        print(f"{r.engine:<10} {r.dtype:<22} {r.case:<12} {r.tok_s:9.1f} {ratio:>11} {cpu:>11}")
    peer = next((r for r in results if r.engine == "llama.cpp"), None)
    for r in results:
        if peer is not None and r.engine == "tuili" and r.case == "single" and "int4" in r.dtype:
            verdict = "ok" if r.tok_s >= LLAMACPP_TARGET * peer.tok_s else "BELOW TARGET"
            print(f"\ntuili {r.dtype} single / llama.cpp single: {r.tok_s / peer.tok_s:.2f}x "
                  f"(target >= {LLAMACPP_TARGET:g}x): {verdict}")
    print_roofline(results)
    if base is None:
        print("\n(no HF float32 single-stream result: ratios and targets skipped)")
        return
    print()
    for case, target in (("single", SINGLE_TARGET), (f"{streams} streams", STREAMS_TARGET)):
        for r in results:
            if r.engine == "tuili" and r.case == case:
                verdict = "ok" if r.ratio >= target else "BELOW TARGET"
                print(f"tuili {r.dtype} {case}: {r.ratio:.2f}x HF fp32 single "
                      f"(target >= {target:g}x): {verdict}")


def print_roofline(results: list[Result]) -> None:
    """Each tuili single stream's weight bytes per token times its rate, against the better of
    a 1 GiB reduction and copy measured now on the same threads."""
    rows = [r for r in results if r.mb_per_token is not None]
    if not rows:
        return
    from tuili.analysis.measure import copy_bandwidth

    peak = copy_bandwidth(torch.device("cpu")) / 1e9
    print(f"\nroofline (1 GiB reduction/copy now: {peak:.1f} GB/s on {torch.get_num_threads()} "
          "threads):")
    for r in rows:
        achieved = r.mb_per_token * r.tok_s / 1e3
        print(f"  tuili {r.dtype}: {r.mb_per_token:.1f} MB/token x {r.tok_s:.1f} tok/s = "
              f"{achieved:.1f} GB/s, {achieved / peak:.0%} of it")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="tuili,hf,llamacpp", help="comma list: tuili,hf,llamacpp")
    p.add_argument("--dtypes", default="float32,bfloat16", help="for tuili and hf")
    p.add_argument("--bf16-quantizations", default="none,auto",
                   help="tuili's bfloat16 runs (auto: the default path, packed int4 on CPU)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream (>= 2)")
    p.add_argument("--streams", type=int, default=32, help="prompts in the tuili batch case")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best is kept")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp")
    p.add_argument("--llamacpp-python", help="an interpreter with llama_cpp installed (e.g. a "
                   "venv's bin/python) to run llama.cpp in; default: this one")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.tokens < 2 or args.streams < 0 or args.repeats < 1:
        p.error("need --tokens >= 2, --streams >= 0, --repeats >= 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = run_all(args)
    base = add_ratios(results)
    print_table(results, base, args.streams)
    if args.json:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": meta, "hf_fp32_single_tok_s": base,
                                         "results": [asdict(r) for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
