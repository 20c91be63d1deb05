"""Structured output's cost: generated tokens/s with a JSON schema against unconstrained, at
batch 1 and 32 (every row generates max_tokens in both: the schema's array cannot end sooner,
the free rows ignore EOS), rounds interleaved so that the machine's drift hits both alike.

    python benchmarks/structured_throughput.py [--device cpu|cuda] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tuili import LLM, SamplingParams
from tuili.structured import StructuredOutputs

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    llm = LLM("smollm2-135m", device=args.device)
    prompt = llm.render_chat([{"role": "user", "content": "List some numbers as JSON."}])
    free = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True)
    constrained = free.with_defaults(ignore_eos=False,
                                     structured_outputs=StructuredOutputs(json=SCHEMA))
    run(llm, prompt, 2, constrained)  # compile and warm up
    run(llm, prompt, 2, free)
    print(f"{'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}")
    for batch in map(int, args.batches.split(",")):
        a, b = [], []
        for _ in range(args.rounds):
            a.append(run(llm, prompt, batch, free))
            b.append(run(llm, prompt, batch, constrained))
        fa, fb = statistics.median(a), statistics.median(b)
        print(f"{batch:5d} {fa:11.1f} {fb:13.1f} {fb / fa:6.3f}", flush=True)


if __name__ == "__main__":
    main()
