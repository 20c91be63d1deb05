"""Speculative decoding on the CPU: SmolLM2-135M single stream, n-gram lookup against none, on
prompts that repeat (code editing, summarising a given text) and prompts that do not.

Run: python benchmarks/cpu_spec_decode.py [--tokens 96] [--k 3] [--lookup-min 1] [--repeats 2]
     [--dtype float32]
     [--batch-rule] [--json OUT]

Greedy, end-of-sequence ignored, --tokens new tokens per prompt. Both engines are loaded once and
take turns on each prompt (the machine is shared and noisy: the best of --repeats runs counts).
Rate = new tokens / wall time of llm.generate (prefill included, the same for both). Acceptance
rate = accepted / proposed draft tokens; mean acceptance length = tokens gained per verify step.
The outputs are checked identical (greedy speculation is lossless).

--batch-rule measures what the per-step off switch (disable_by_batch_size) rests on: for B
decoding sequences, the cost of a step of B plain decodes against one where each also verifies k
guesses (B * (k + 1) rows), and so the acceptance each batch size would need to break even.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tuili import LLM, SamplingParams

CODE = '''Rename the variable `total` to `subtotal` in this function and give the whole function back.

def invoice_total(items, tax_rate):
    total = 0
    for item in items:
        total += item.price * item.quantity
    if total > 100:
        total = total * 0.95
    total = total + total * tax_rate
    return round(total, 2)

def invoice_total(items, tax_rate):
    subtotal = 0
'''
TEXT = ("Summarise the text below in two sentences, reusing its words.\n\nText: The town of "
        "Elmwood voted on Tuesday to rebuild the old stone bridge over the Marsh River. The bridge "
        "was closed in March after engineers found cracks in two of its arches. Rebuilding will "
        "cost four million dollars and take eighteen months. Until then, drivers must use the "
        "highway bridge ten miles to the south, and the town will run a free shuttle bus for "
        "people who walk or cycle.\n\nSummary: The town of Elmwood voted on Tuesday to rebuild")
FRESH = [("story", "Write a short story about a robot who learns to paint."),
         ("facts", "List five facts about the planet Mars.")]
PROMPTS = [("code edit", CODE, True), ("summarise", TEXT, True)] + [(n, p, False) for n, p in FRESH]


def timed(llm: LLM, prompt: str, params: SamplingParams) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0].outputs[0]
    return time.perf_counter() - start, out.token_ids


def single_stream(args) -> list[dict]:
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 3,
            "prompt_lookup_min": args.lookup_min}
    plain = LLM("smollm2-135m", dtype=args.dtype)
    ngram = LLM("smollm2-135m", dtype=args.dtype, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    for llm in (plain, ngram):  # warm-up
        llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    rows = []
    for name, prompt, repeats in PROMPTS:
        best = {"none": float("inf"), "ngram": float("inf")}
        ngram.engine.speculator.reset_stats()
        for _ in range(args.repeats):
            t0, want = timed(plain, prompt, params)
            t1, got = timed(ngram, prompt, params)
            assert got == want, f"{name}: speculation changed the greedy output"
            best["none"], best["ngram"] = min(best["none"], t0), min(best["ngram"], t1)
        s = ngram.engine.spec_stats
        rows.append({"prompt": name, "repeats": repeats, "none_tok_s": args.tokens / best["none"],
                     "ngram_tok_s": args.tokens / best["ngram"],
                     "speedup": best["none"] / best["ngram"], "acceptance_rate": s.acceptance_rate,
                     "mean_acceptance_length": s.mean_acceptance_length})
    print(f"SmolLM2-135M {args.dtype}, single stream, {args.tokens} greedy tokens, ngram "
          f"k={args.k} lookup {args.lookup_min}..3, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'prompt':<11} {'repeats':>7} {'none tok/s':>10} {'ngram tok/s':>11} {'speedup':>8} "
          f"{'accept':>7} {'mean len':>8}")
    for r in rows:
        print(f"{r['prompt']:<11} {str(r['repeats']):>7} {r['none_tok_s']:>10.1f} "
              f"{r['ngram_tok_s']:>11.1f} {r['speedup']:>7.2f}x {r['acceptance_rate']:>7.1%} "
              f"{r['mean_acceptance_length']:>8.2f}")
    return rows


@torch.inference_mode()
def batch_rule(args) -> list[dict]:
    """Model forward cost of B decodes vs B verifies of k guesses each (rows B * (k + 1))."""
    from tuili.engine.engine import LLMEngine
    from tuili.config import EngineConfig

    engine = LLMEngine(EngineConfig(model="smollm2-135m", dtype=args.dtype))
    model, runner = engine.runner.model, engine.runner
    bs = engine.config.block_size
    context = 256
    rows = []
    for B in (1, 2, 4, 8, 16):
        costs = {}
        for k in (0, args.k):
            n = k + 1
            seqs = [(b * n, n, context) for b in range(B)] if k else []
            meta = model.backend.attention.metadata(
                slot_mapping=torch.arange(B * n), block_tables=torch.stack(
                    [torch.arange(b * 32, b * 32 + 32) for b in range(B)]),
                seq_lens=torch.full((B,), context + n), positions=torch.full((B * n,), context),
                rope=runner.rope, num_decodes=0 if k else B,
                max_decode_len=0 if k else context + 1, prefills=seqs)
            ids = torch.zeros(B * n, dtype=torch.long)
            times = []
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                model.logits(model(ids, meta))
                times.append(time.perf_counter() - t)
            costs[k] = min(times[1:])
        ratio = costs[args.k] / costs[0]
        # tokens per verify step must beat its cost in decode steps: 1 + k * a >= ratio
        need = (ratio - 1) / args.k
        rows.append({"batch": B, "decode_ms": costs[0] * 1e3, "verify_ms": costs[args.k] * 1e3,
                     "cost_ratio": ratio, "break_even_acceptance": need})
    print(f"\nper-step forward cost, context {context}, k={args.k} (block {bs})")
    print(f"{'batch':>5} {'decode ms':>9} {'verify ms':>9} {'ratio':>6} {'break-even accept':>17}")
    for r in rows:
        print(f"{r['batch']:>5} {r['decode_ms']:>9.1f} {r['verify_ms']:>9.1f} "
              f"{r['cost_ratio']:>6.2f} {r['break_even_acceptance']:>17.1%}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lookup-min", type=int, default=1, help="prompt_lookup_min")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-rule", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"batch_rule": batch_rule(args)} if args.batch_rule else {
        "single_stream": single_stream(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
