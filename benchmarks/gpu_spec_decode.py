"""Speculative decoding on the GPU, Llama-3.1-8B shape (random bf16 weights, 32 layers), batch 1:
what a verify step of k guesses costs against a plain decode step, beside HF transformers.

    python benchmarks/gpu_spec_decode.py [--ks 1,2,3,4,5,6,7,8] [--tokens 128] [--context 128]
                                          [--eagle-ks 1,2,4] [--batches 1,2,4,8,16,32]
                                          [--batch-k 4] [--draft-self] [--json OUT]

Random weights make acceptance meaningless, so the guesses come from an oracle: the target's own
greedy continuation, computed first without speculation ("a draft equal to the target", every
guess kept, at no draft cost). Per k:
- tuili step ms: wall time per engine step of the speculating engine (one verify of k + 1 rows,
  CUDA graphs where k + 1 <= 8 rows, then the sync read-back), against the plain engine's decode
  step (async scheduling, decode CUDA graphs): `cost` = verify / decode;
- ceiling tok/s: tokens / wall time with every guess kept, and its ratio to plain decode (the
  issue's target: >= 2.5x at k = 4);
- implied speedup at acceptance a: E[tokens per step] / cost, E = (1 - a^(k+1)) / (1 - a);
- HF: the same shape's forward of 1 token and of k + 1 tokens after `--context` cached ones
  (DynamicCache, cropped back after each), as HF's own verify cost ratio.
On plain random weights the decode path (GEMV kernels) and the verify path (prefill kernels) part
at bf16 near-ties and the oracle's guesses are often rejected; --branch-scale 0.1 scales every
layer's o_proj and down_proj (the same bytes to read) so that the network is less chaotic and
the two paths agree: the ceiling shown as it would be for a draft that guesses right. --echo goes
further: embeddings scaled up and copied into the LM head (and branches at 0.01) make each
position's greedy token its input token by a margin no rounding crosses, so every guess is kept
on the same bytes and FLOPs as the plain random model.
--draft-self also runs the real draft-model proposer with the target as its draft (eager draft
steps, every guess kept): the end-to-end rate with the draft's cost included.

Two more tables:
- EAGLE arm: random EAGLE-1 and EAGLE-3 heads of the shape (tests/eagle_heads.py) proposing for
  real (head steps replaying CUDA graphs) at k in --eagle-ks; random heads are never right, so each step gains
  one token and its wall time is the whole cost of a speculative step (head catch-up + k - 1
  head decodes + verify): `cost` = step / plain decode step, and the speedup it implies at
  acceptance a (the kept guesses of a trained head are measured elsewhere: BENCHMARKS.md);
- batch sweep (--batches): plain decode step against a verify step of --batch-k oracle guesses
  per request (every one kept) at each batch size; where the implied speedup at a = 0.7 drops
  below 1, speculation stops paying: the disable_by_batch_size rule for this GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import cuda_time  # noqa: E402
from tests.eagle_heads import save_head  # noqa: E402
from tests.gpu.random_models import SHAPES, build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.engine.spec_decode.draft import Draft  # noqa: E402

RATES = (0.5, 0.7, 0.9)


class OracleProposer:
    """Guesses the continuation it was given: every guess is kept."""

    def __init__(self, future: dict[str, list[int]]):
        self.future = future

    def propose(self, reqs, caps):
        out = []
        for r, cap in zip(reqs, caps):
            want = self.future[r.request_id]
            n = r.num_output_tokens
            out.append(Draft(want[n:n + cap]) if want[n:n + cap] else None)
        return out

    def release(self, req) -> None:
        pass


def run_steps(llm: LLM, prompt: list[int], params: SamplingParams, rid: str) -> tuple[float, int, list[int]]:
    """(seconds after the first token, steps after it, tokens) of one request."""
    engine = llm.engine
    engine.add_request(rid, prompt, params, stream=True)
    first, steps, tokens = None, 0, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids and first is None:
                torch.cuda.synchronize()
                first, steps = time.perf_counter(), 0
            tokens = out.outputs[0].token_ids
        steps += 1
    torch.cuda.synchronize()
    return time.perf_counter() - first, steps, tokens


@torch.inference_mode()
def hf_costs(hf, context: int, ks: list[int]) -> dict[int, float]:
    from transformers import DynamicCache

    ids = torch.randint(2, hf.config.vocab_size, (1, context), device="cuda")
    cache = DynamicCache()
    hf(input_ids=ids, past_key_values=cache, use_cache=True)
    out = {}
    for k in [0] + ks:
        step = torch.randint(2, hf.config.vocab_size, (1, k + 1), device="cuda")

        def fwd():
            hf(input_ids=step, past_key_values=cache, use_cache=True)
            cache.crop(context)

        out[k] = cuda_time(fwd, repeat=10, warmup=2)
    return out


def run_batch(llm: LLM, prompts: list[list[int]], params: SamplingParams,
              prefix: str) -> tuple[float, dict[str, list[int]]]:
    """(seconds per step after every request has its first token, tokens by request id) of a
    batch run to the end together."""
    engine = llm.engine
    rids = [f"{prefix}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(rids, prompts):
        engine.add_request(rid, prompt, params, stream=True)
    started, first, steps, out = set(), None, 0, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] = o.outputs[0].token_ids
            if o.outputs[0].token_ids:
                started.add(o.request_id)
        if first is None and len(started) == len(rids):
            torch.cuda.synchronize()
            first, steps = time.perf_counter(), 0
        steps += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - first) / max(steps, 1), out


def implied(cost: float, k: int) -> dict[float, float]:
    """Speedup at acceptance a: expected tokens per verify step over its cost in decode steps."""
    return {a: (1 - a ** (k + 1)) / (1 - a) / cost for a in RATES}


def batch_prompts(n: int, context: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128256, (context,), generator=g).tolist() for _ in range(n)]


def header(*cols: str) -> None:
    """A markdown table's head (BENCHMARKS.md takes the tables as printed)."""
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")


def free() -> None:
    """Give the GPU memory of the objects just deleted back."""
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--eagle-ks", default="1,2,4")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--batch-k", type=int, default=4)
    p.add_argument("--batch-tokens", type=int, default=48)
    p.add_argument("--draft-self", action="store_true")
    p.add_argument("--branch-scale", type=float, default=1.0,
                   help="scale the layers' o_proj/down_proj weights (below 1: a less chaotic "
                        "random model, whose decode and verify paths agree, to show the ceiling)")
    p.add_argument("--echo", action="store_true",
                   help="weights whose greedy token is the input token by a wide margin "
                        "(random_models.build echo; branch scale 0.01 unless given): every "
                        "kernel path agrees, so the oracle's guesses are all kept")
    p.add_argument("--json")
    args = p.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    eagle_ks = [int(k) for k in args.eagle_ks.split(",") if k]
    batches = [int(b) for b in args.batches.split(",") if b]
    results = {"ks": {}, "eagle": {}, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        hf = build("llama3-8b", Path(tmp), num_layers=args.layers,
                   branch_scale=args.branch_scale if args.branch_scale != 1.0 or not args.echo
                   else 0.01, echo=args.echo)
        hf_ms = {k: s * 1e3 for k, s in hf_costs(hf, args.context, ks).items()}
        target_cfg = {**SHAPES["llama3-8b"][2], "num_hidden_layers": args.layers}
        del hf
        free()
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(2, 128256, (args.context,), generator=g).tolist()
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=args.batch_tokens, ignore_eos=True)
        most = max(batches, default=1)
        opts = dict(dtype="bfloat16", device="cuda", kv_cache_memory_gb=6,
                    max_num_seqs=max(8, most),
                    max_model_len=args.context + args.tokens + 64)
        plain = LLM(tmp, **opts)
        run_steps(plain, prompt, params, "warm")
        secs, steps, want = run_steps(plain, prompt, params, "plain")
        decode_ms, plain_tok_s = secs / steps * 1e3, (len(want) - 1) / secs
        plain_batch, futures = {}, {}
        warm = replace(short, max_tokens=8)  # each batch size's kernels compile before timing
        for b in batches:
            run_batch(plain, batch_prompts(b, args.context, b), warm, f"warm{b}")
            step_s, out = run_batch(plain, batch_prompts(b, args.context, b), short, f"plain{b}")
            plain_batch[b] = step_s * 1e3
            futures[b] = out
        del plain
        free()
        llm = LLM(tmp, speculative_config={"method": "ngram", "num_speculative_tokens": max(ks),
                                           "disable_by_batch_size": max(64, most)}, **opts)
        spec = llm.engine.speculator
        base = spec.config
        print(f"Llama-3.1-8B shape ({args.layers} layers, random bf16), batch 1, context "
              f"{args.context}, {args.tokens} greedy tokens; plain decode step {decode_ms:.2f} ms "
              f"= {plain_tok_s:.1f} tok/s; HF forward of 1 token {hf_ms[0]:.2f} ms")
        print("\nverify step of k oracle guesses (every one kept) against a plain decode step")
        header(f"{'k':>2}", f"{'step ms':>8}", f"{'cost':>5}", f"{'HF cost':>7}",
               f"{'ceiling tok/s':>13}", f"{'ceiling x':>9}", *(f"{'x@a=' + str(a):>7}" for a in RATES))
        for k in ks:
            spec.config = replace(base, num_speculative_tokens=k)
            # The oracle is the target's own greedy continuation; where a bf16 near-tie makes the
            # verify step (a prefill kernel over k + 1 rows) pick another token than the plain
            # decode did, the continuation the verify path takes becomes the next round's
            # oracle, until every guess is kept (a draft equal to the target, in the numerics of
            # the verify step) or three rounds have run.
            future = want
            for rid in ("warm", "oracle0", "oracle1", "oracle2"):
                spec.proposer = OracleProposer({f"{rid}-{k}": future})
                spec.reset_stats()
                secs, steps, got = run_steps(llm, prompt, params, f"{rid}-{k}")
                if rid != "warm" and got == future:
                    break
                if rid != "warm":
                    future = got
            kept = spec.stats.acceptance_rate
            verify_ms = secs / steps * 1e3
            cost = verify_ms / decode_ms
            tok_s = (len(got) - 1) / secs
            imp = implied(cost, k)
            results["ks"][k] = {"verify_step_ms": verify_ms, "cost": cost,
                                "hf_cost": hf_ms[k] / hf_ms[0], "ceiling_tok_s": tok_s,
                                "ceiling_speedup": tok_s / plain_tok_s, "oracle_acceptance": kept,
                                "implied_speedup": imp, "same_tokens": got == want}
            print(f"| {k:>2} | {verify_ms:>8.2f} | {cost:>5.2f} | {hf_ms[k] / hf_ms[0]:>7.2f} | "
                  f"{tok_s:>13.1f} | {tok_s / plain_tok_s:>8.2f}x | "
                  + " | ".join(f"{imp[a]:>6.2f}x" for a in RATES) + " |"
                  + f"  kept {kept:.0%}" + ("" if got == want else " (bf16 ties: tokens differ "
                                                      "from plain decode's)"))
        if 4 in results["ks"]:
            c = results["ks"][4]["ceiling_speedup"]
            print(f"ceiling at k = 4 (draft = target, every guess kept): {c:.2f}x plain tok/s "
                  f"(target >= 2.5x: {'met' if c >= 2.5 else 'NOT met'})")
        k = args.batch_k
        spec.config = replace(base, num_speculative_tokens=k)
        print(f"\nbatch sweep: plain decode step against a verify step of {k} oracle guesses "
              f"per request ({args.batch_tokens} tokens each, context {args.context})")
        header(f"{'batch':>5}", f"{'decode ms':>9}", f"{'verify ms':>9}", f"{'cost':>5}",
               f"{'ceiling x':>9}", *(f"{'x@a=' + str(a):>7}" for a in RATES))
        stops = None
        for b in batches:
            spec.proposer = OracleProposer({rid.replace(f"plain{b}", name): toks
                                            for rid, toks in futures[b].items()
                                            for name in (f"oracle{b}", f"warmoracle{b}")})
            run_batch(llm, batch_prompts(b, args.context, b), warm, f"warmoracle{b}")
            step_s, _ = run_batch(llm, batch_prompts(b, args.context, b), short, f"oracle{b}")
            verify_ms = step_s * 1e3
            cost = verify_ms / plain_batch[b]
            imp = implied(cost, k)
            ceiling = (k + 1) / cost
            results["batches"][b] = {"decode_step_ms": plain_batch[b], "verify_step_ms": verify_ms,
                                     "cost": cost, "ceiling_speedup": ceiling,
                                     "implied_speedup": imp}
            print(f"| {b:>5} | {plain_batch[b]:>9.2f} | {verify_ms:>9.2f} | {cost:>5.2f} | "
                  f"{ceiling:>8.2f}x | " + " | ".join(f"{imp[a]:>6.2f}x" for a in RATES) + " |")
            if stops is None and imp[0.7] < 1:
                stops = b
        rule = (f"speculation stops paying (a = 0.7, k = {k}) at batch {stops}: "
                f"disable_by_batch_size = {max(b for b in batches if b < stops)}"
                if stops and stops > min(batches) else
                f"speculation pays at every batch measured (up to {most}) at a = 0.7, k = {k}"
                if stops is None else f"speculation does not pay even at batch {stops}")
        if batches:
            print(rule)
            results["disable_by_batch_size_rule"] = rule
        results.update(decode_step_ms=decode_ms, plain_tok_s=plain_tok_s, hf_ms=hf_ms)
        del llm, spec
        free()
        if eagle_ks:
            print(f"\nEAGLE arm: random heads proposing for real (head steps in CUDA graphs; "
                  f"nothing kept, so a step gains one token), batch 1, {args.batch_tokens} tokens")
            header(f"{'head':>6}", f"{'k':>2}", f"{'step ms':>8}", f"{'cost':>5}",
                   *(f"{'x@a=' + str(a):>7}" for a in RATES))
        for method in ("eagle", "eagle3") if eagle_ks else ():
            head = save_head(Path(tmp) / f"head-{method}", target_cfg, method == "eagle3",
                             draft_vocab=32000 if method == "eagle3" else None)
            llm = LLM(tmp, speculative_config={"method": method, "model": str(head),
                                               "num_speculative_tokens": max(eagle_ks),
                                               "min_acceptance_rate": 0}, **opts)
            spec = llm.engine.speculator
            base = spec.config
            for k in eagle_ks:
                spec.config = replace(base, num_speculative_tokens=k)
                run_steps(llm, prompt, short, f"warm-{method}-{k}")
                secs, steps, _ = run_steps(llm, prompt, short, f"{method}-{k}")
                step_ms = secs / steps * 1e3
                cost = step_ms / decode_ms
                imp = implied(cost, k)
                results["eagle"][f"{method}-k{k}"] = {"step_ms": step_ms, "cost": cost,
                                                      "implied_speedup": imp}
                print(f"| {method:>6} | {k:>2} | {step_ms:>8.2f} | {cost:>5.2f} | "
                      + " | ".join(f"{imp[a]:>6.2f}x" for a in RATES) + " |")
            del llm, spec
            free()
        if args.draft_self:
            llm = LLM(tmp, speculative_config={"model": tmp, "num_speculative_tokens": 4}, **opts)
            run_steps(llm, prompt, params, "warm-draft")
            llm.engine.speculator.reset_stats()
            secs, steps, got = run_steps(llm, prompt, params, "draft")
            s = llm.engine.spec_stats
            results["draft_self_k4"] = {"tok_s": (len(got) - 1) / secs,
                                        "acceptance_rate": s.acceptance_rate}
            print(f"draft = target (real draft model, eager), k=4: {(len(got) - 1) / secs:.1f} "
                  f"tok/s ({(len(got) - 1) / secs / plain_tok_s:.2f}x plain), acceptance "
                  f"{s.acceptance_rate:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
