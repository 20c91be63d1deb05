"""Structured output's cost: generated tokens/s with a JSON schema against unconstrained, at
batch 1 and 32 (every row generates max_tokens in both: the schema's array cannot end sooner,
the free rows ignore EOS), rounds interleaved so that the machine's drift hits both alike.
On the CPU: SmolLM2-135M. On the GPU: random weights of a real shape (--shape, Llama-3.1-8B's by
default, all 32 layers) with a 128k byte-level vocabulary built offline
(tests/gpu/random_models.vocabulary_tokenizer), so the grammar's masks cost what a real one's do;
xgrammar must be installed there (carry its wheel).

    python benchmarks/structured_throughput.py [--device cpu|cuda] [--tokens 64]
    python3 benchmarks/structured_throughput.py --device cuda [--shape llama3-8b] [--layers 32]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuili import LLM, SamplingParams  # noqa: E402
from tuili.structured import StructuredOutputs  # noqa: E402

# an array of at least 200 bounded integers: every row runs to max_tokens
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
          "minItems": 200}


def run(llm: LLM, prompt: list[int], batch: int, params: SamplingParams) -> float:
    start = time.perf_counter()
    outs = llm.generate([prompt] * batch, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == batch * params.max_tokens, tokens
    return tokens / seconds


def random_model(shape: str, layers: int) -> str:
    """A folder with a random `shape`-shaped model, its vocabulary built offline."""
    from tests.gpu.random_models import build_with_vocabulary

    folder = Path(tempfile.mkdtemp())
    build_with_vocabulary(shape, folder, layers)  # the HF model it returns is dropped here
    gc.collect()
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--shape", default=None, help="random weights of this shape (GPU default: "
                                                  "llama3-8b); else SmolLM2-135M")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    import torch

    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    shape = args.shape or ("llama3-8b" if on_gpu else None)
    if shape:
        start = time.perf_counter()
        model = random_model(shape, args.layers)
        torch.cuda.empty_cache()
        llm = LLM(model, device=args.device)
        print(f"random {shape} ({args.layers} layers), 128k-class vocabulary built offline; "
              f"ready in {time.perf_counter() - start:.0f}s")
        prompt = llm.tokenizer.encode("List some numbers as JSON: ")
    else:
        llm = LLM("smollm2-135m", device=args.device)
        prompt = llm.render_chat([{"role": "user", "content": "List some numbers as JSON."}])
    free = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True)
    constrained = free.with_defaults(ignore_eos=False,
                                     structured_outputs=StructuredOutputs(json=SCHEMA))
    run(llm, prompt, 2, constrained)  # compile and warm up
    run(llm, prompt, 2, free)
    print(f"\n{args.tokens} tokens a row, median of {args.rounds} interleaved rounds\n")
    print("| batch | unconstrained tok/s | JSON schema tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for batch in map(int, args.batches.split(",")):
        a, b = [], []
        for _ in range(args.rounds):
            a.append(run(llm, prompt, batch, free))
            b.append(run(llm, prompt, batch, constrained))
        fa, fb = statistics.median(a), statistics.median(b)
        print(f"| {batch} | {fa:.1f} | {fb:.1f} | {fb / fa:.3f} |", flush=True)


if __name__ == "__main__":
    main()
