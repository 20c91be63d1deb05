"""CPU decode speed on SmolLM2-135M-Instruct (Q4_1 GGUF): tuili beside HF transformers and llama.cpp.

Run: python benchmarks/cpu_decode.py [--engines tuili,hf,llamacpp] [--dtypes float32,bfloat16]
                                      [--tokens 128] [--streams 32] [--repeats 2] [--json OUT]

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
- N streams (tuili only): --streams different prompts through one llm.generate(prompts, params);
  rate = all generated tokens / wall time (prefill included).

Every case gets a warm-up run, then the best of --repeats timed runs (the machine is noisy).
The ratio column is each rate over HF's float32 single-stream rate; the targets checked at the end
are tuili single stream >= 1.8x and tuili N streams >= 10x that rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PROMPT = "Write a short story about a robot who learns to paint."
TOPICS = ("a lighthouse keeper", "a lost kitten", "a time traveller", "a dragon", "a baker",
          "a haunted house", "a space station", "a pirate ship", "a detective", "a wizard's apprentice",
          "a desert caravan", "a city under the sea", "a talking tree", "a chess champion",
          "a mountain village", "a violin maker", "a secret garden", "a train at midnight",
          "a robot gardener", "an old map", "a volcano island", "a clockmaker", "a snowstorm",
          "a circus", "a forgotten library", "a river journey", "a knight", "a bee colony",
          "a midnight market", "a comet", "a small fox", "a glass castle")
SINGLE_TARGET, STREAMS_TARGET = 1.8, 10.0  # tuili over HF float32 single stream


@dataclass
class Result:
    engine: str
    dtype: str
    case: str
    tok_s: float
    ratio: float | None = None  # over HF float32 single stream


def best_of(run: Callable[[], float], repeats: int) -> float:
    """One warm-up run, then the best rate of `repeats` timed runs."""
    run()
    return max(run() for _ in range(repeats))


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
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (0.0, 0)
    for out in llm.stream(PROMPT, tuili_params(tokens)):
        now, count = time.perf_counter(), len(out.outputs[0].token_ids)
        if count and first is None:
            first = (now, count)
        last = (now, count)
    assert first is not None and last[1] == tokens, f"tuili gave {last[1]} tokens, wanted {tokens}"
    return (last[1] - first[1]) / (last[0] - first[0])


def tuili_streams(llm, tokens: int, streams: int) -> float:
    """Batch throughput: all generated tokens over the wall time of one generate() call."""
    prompts = stream_prompts(streams)
    start = time.perf_counter()
    outs = llm.generate(prompts, tuili_params(tokens))
    elapsed = time.perf_counter() - start
    total = sum(o.num_generated_tokens for o in outs)
    assert total == tokens * streams, f"tuili gave {total} tokens, wanted {tokens * streams}"
    return total / elapsed


def bench_tuili(dtype: str, quantization: str, args: argparse.Namespace) -> list[Result]:
    from tuili import LLM

    llm = LLM("smollm2-135m", dtype=dtype, quantization=quantization, num_threads=args.threads)
    label = dtype + ("+int4" if llm.engine.runner.model.layers[0].mlp.down_proj.method.name == "int4"
                     else "")
    single = best_of(lambda: tuili_single(llm, args.tokens), args.repeats)
    many = best_of(lambda: tuili_streams(llm, args.tokens, args.streams), args.repeats)
    return [Result("tuili", label, "single", single),
            Result("tuili", label, f"{args.streams} streams", many)]


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

def llamacpp_single(llm, prompt_ids: list[int], tokens: int) -> float:
    llm.reset()
    stamps: list[float] = []
    # generate() edits the list it is given, so hand it a copy; it yields past EOS on its own.
    for _ in llm.generate(list(prompt_ids), temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == tokens:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_llamacpp(gguf: Path, args: argparse.Namespace) -> list[Result]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    rate = best_of(lambda: llamacpp_single(llm, ids, args.tokens), args.repeats)
    llm.close()
    return [Result("llama.cpp", "gguf q4_1", "single", rate)]


# ---- driver -----------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> list[Result]:
    from tuili.models.loader import resolve

    gguf = resolve("smollm2-135m")
    dtypes = args.dtypes.split(",")
    benches: list[Callable[[], list[Result]]] = []
    for engine in args.engines.split(","):
        if engine == "tuili":
            # bf16 twice: dequantized only, and with the GGUF's 4-bit weights packed (the default)
            benches += [lambda d=d, q=q: bench_tuili(d, q, args) for d in dtypes
                        for q in (("none", "auto") if d == "bfloat16" else ("none",))]
        elif engine == "hf":
            benches += [lambda d=d: bench_hf(d, gguf, args) for d in dtypes]
        elif engine == "llamacpp":
            benches.append(lambda: bench_llamacpp(gguf, args))
        else:
            raise SystemExit(f"unknown engine {engine!r}: use tuili, hf, llamacpp")
    results: list[Result] = []
    for bench in benches:  # one model in memory at a time
        results += bench()
        gc.collect()
    return results


def add_ratios(results: list[Result]) -> float | None:
    base = next((r.tok_s for r in results if (r.engine, r.dtype, r.case) == ("hf", "float32", "single")),
                None)
    for r in results:
        r.ratio = r.tok_s / base if base else None
    return base


def print_table(results: list[Result], base: float | None, streams: int) -> None:
    print(f"\n{'engine':<10} {'dtype':<14} {'case':<12} {'tok/s':>9} {'vs HF fp32':>11}")
    print("-" * 60)
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(f"{r.engine:<10} {r.dtype:<14} {r.case:<12} {r.tok_s:9.1f} {ratio:>11}")
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="tuili,hf,llamacpp", help="comma list: tuili,hf,llamacpp")
    p.add_argument("--dtypes", default="float32,bfloat16", help="for tuili and hf")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per stream (>= 2)")
    p.add_argument("--streams", type=int, default=32, help="prompts in the tuili batch case")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best is kept")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.tokens < 2 or args.streams < 1 or args.repeats < 1:
        p.error("need --tokens >= 2, --streams >= 1, --repeats >= 1")
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
