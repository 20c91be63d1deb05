"""CPU decode speed on SmolLM2-135M: tuili beside HF transformers and llama.cpp, in one run.

Cases
- single stream: one greedy request, ignore_eos, N new tokens; decode rate = (N - 1) / (time from
  the first token to the last), so prefill is not counted. HF transformers runs a bare forward loop
  with its KV cache on the same dequantized weights (from the same GGUF); llama.cpp
  (llama-cpp-python) runs the GGUF itself, Q4_1 kernels and all.
- 32 streams: 32 different prompts at once through LLM.generate, N tokens each; total tok/s.
Each timing is the best of --repeats runs after a warm-up.

    python benchmarks/cpu_decode.py [--tokens 128] [--streams 32] [--engines tuili,hf,llamacpp]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tuili import LLM, SamplingParams
from tuili.models.export import export_hf_folder
from tuili.models.loader import resolve

PROMPT = "Write a story about a cat who learns to fly."


@dataclass
class Result:
    engine: str
    dtype: str
    case: str
    tok_s: float


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    return max(fn() for _ in range(repeats))


def tuili_single(llm: LLM, n: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    stamps = [time.perf_counter() for _ in llm.stream(PROMPT, params)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def tuili_streams(llm: LLM, n: int, streams: int) -> float:
    prompts = [f"Write a story about topic number {i}: a {w}." for i, w in
               zip(range(streams), ("cat dog fox owl bee ant elk yak" * 8).split())]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


@torch.inference_mode()
def hf_single(model, ids: list[int], n: int) -> float:
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n - 1):
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (n - 1) / (time.perf_counter() - start)


def llamacpp_single(llm, ids: list[int], n: int) -> float:
    llm.reset()
    stamps = []
    for _ in llm.generate(ids, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run(args) -> list[Result]:
    results: list[Result] = []
    gguf = resolve("smollm2-135m")
    engines = args.engines.split(",")
    ids = None
    # HF runs plain dequantized weights (its GGUF loader would keep them packed): export them.
    hf_folder = str(export_hf_folder(gguf, Path(tempfile.mkdtemp()) / "smollm2"))
    for dtype in args.dtypes.split(","):
        for quant in ("none", "int4") if "tuili" in engines else ():
            if quant == "int4" and dtype != "bfloat16":
                continue  # the int4 kernel takes bf16 activations
            llm = LLM("smollm2-135m", dtype=dtype, quantization=quant, num_threads=args.threads)
            ids = llm.tokenizer.encode(PROMPT)
            label = dtype + ("+int4" if quant == "int4" else "")
            results.append(Result("tuili", label, "single", best(lambda: tuili_single(llm, args.tokens), args.repeats)))
            results.append(Result("tuili", label, f"{args.streams} streams",
                                  best(lambda: tuili_streams(llm, args.tokens, args.streams), args.repeats)))
            del llm
        if "hf" in engines:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(
                hf_folder, dtype=getattr(torch, dtype)).eval()
            ids = ids or transformers.AutoTokenizer.from_pretrained(hf_folder)(PROMPT).input_ids
            results.append(Result("hf", dtype, "single", best(lambda: hf_single(model, ids, args.tokens), args.repeats)))
            del model
    if "llamacpp" in engines:
        import llama_cpp

        lc = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, verbose=False)
        ids = lc.tokenize(PROMPT.encode(), add_bos=False)
        results.append(Result("llama.cpp", "q4_1", "single",
                              best(lambda: llamacpp_single(lc, ids, args.tokens), args.repeats)))
    return results


def report(results: list[Result]) -> None:
    hf32 = next((r.tok_s for r in results if (r.engine, r.dtype, r.case) == ("hf", "float32", "single")), None)
    print(f"{'engine':<10} {'dtype':<14} {'case':<11} {'tok/s':>8} {'x HF fp32 single':>17}")
    for r in results:
        ratio = f"{r.tok_s / hf32:.2f}x" if hf32 else "-"
        print(f"{r.engine:<10} {r.dtype:<14} {r.case:<11} {r.tok_s:8.1f} {ratio:>17}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--engines", default="tuili,hf,llamacpp")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
