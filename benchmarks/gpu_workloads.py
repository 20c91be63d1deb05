"""GPU workloads: tuili beside HF transformers on the same random weights of real shapes (bf16),
each case also as a ratio to the roofline measured in the same run.

Cases (issue 3): batch-1 decode time per token at 128 and 8k context; time to first token of a
128- and a 2048-token prompt (and of the same prompts with the prefill CUDA graphs set aside); a
128-token prompt arriving beside 3 decoding streams (tuili alone: its TTFT and the streams' longest
gap, the mixed step in a graph and eagerly); 256 requests x (512 in, 256 out) wall time; 256
requests with in/out lengths uniform in 100-1024, output tok/s. HF runs a bare forward loop with
its KV cache for decode, one forward for TTFT, and `generate` on statically padded batches for
throughput (a 32- or 64-request slice, its rate scaled to the whole workload).

    python benchmarks/gpu_workloads.py [--shapes smollm2-135m,qwen3-0.6b,llama3-8b] [--json F]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_common import (attention_flops, cuda_time, kv_bytes_per_token,  # noqa: E402
                                   linear_params, measure_ceilings, now)
from tests.gpu.random_models import SHAPES, build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402

FULL_LAYERS = {"smollm2-135m": 30, "llama3-8b": 32, "qwen3-0.6b": 28, "qwen2.5-7b": 28}
CASES = {"smollm2-135m": ["decode128", "ttft128", "arrival"],
         "llama3-8b": ["decode128", "decode8k", "ttft128", "ttft2048", "arrival",
                       "batch256x512x256"],
         "qwen3-0.6b": ["decode128", "batch256-uniform"],
         "qwen2.5-7b": ["decode128"]}
DECODE_TOKENS = 64


def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(n)]


def workload(case: str, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) of a throughput case."""
    rng = random.Random(0)
    if case == "batch256x512x256":
        return [random_prompt(rng, vocab, 512) for _ in range(256)], [256] * 256
    lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
    return [random_prompt(rng, vocab, i) for i, _ in lengths], [o for _, o in lengths]


# ---- HF transformers ---------------------------------------------------------------------------

@torch.inference_mode()
def hf_decode_ms(model, prompt: list[int]) -> float:
    best = float("inf")
    for _ in range(2):
        out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        start = now()
        for _ in range(DECODE_TOKENS - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        best = min(best, (now() - start) / (DECODE_TOKENS - 1))
        del out
    return best * 1e3


@torch.inference_mode()
def hf_ttft_ms(model, prompts: list[list[int]]) -> float:
    times = []
    for p in prompts:
        start = now()
        model(input_ids=torch.tensor([p], device="cuda"), logits_to_keep=1).logits.argmax(-1).item()
        times.append(now() - start)
    return sorted(times)[len(times) // 2] * 1e3


@torch.inference_mode()
def hf_throughput(model, prompts: list[list[int]], outs: list[int]) -> float:
    """Output tok/s of HF generate on one left-padded static batch (tokens a request asked for)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    start = now()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(outs),
                   min_new_tokens=max(outs), do_sample=False, pad_token_id=0)
    return sum(outs) / (now() - start)


# ---- tuili -------------------------------------------------------------------------------------

def cublas_linears_ms(model) -> float:
    """Every linear layer of the model at batch 1 and nothing else, one CUDA graph of cuBLAS
    calls: issue 3's yardstick for a whole decode step (5.60 ms for Llama-3.1-8B there)."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in ws}
    return cuda_time(lambda: [F.linear(xs[w.shape[1]], w) for w in ws], repeat=20, graph=True) * 1e3


def tuili_decode_ms(llm: LLM, prompt: list[int], tokens: int = DECODE_TOKENS,
                    rounds: int = 2, **sampling) -> float:
    """Time between streamed tokens as a client sees them, the best of `rounds` streams (greedy
    unless `sampling` says otherwise). Stamped without a device sync: a token reaches the host
    only after the GPU made it, and a sync at each output would stall the pipeline (the engine
    queues the next step before it hands over this one's tokens)."""
    params = SamplingParams(**{"temperature": 0, **sampling}, max_tokens=tokens, ignore_eos=True)
    best = float("inf")
    for _ in range(rounds):
        stamps = []
        for _ in llm.stream(prompt, params):
            stamps.append(time.perf_counter())
        best = min(best, (stamps[-1] - stamps[1]) / (len(stamps) - 2))
    return best * 1e3


def sampled_decode(name: str, llm: LLM, prompt: list[int]) -> dict:
    """Batch-1 decode with top_p 0.9 at temperature 0.7, with the sampling graphs and without
    (the same kernels launched one by one), beside greedy, in one process."""
    graphs = llm.engine.runner.graphs
    greedy = tuili_decode_ms(llm, prompt)
    ms = tuili_decode_ms(llm, prompt, temperature=0.7, top_p=0.9)
    graphs.sampler_for = lambda n: None  # shadows the method until deleted
    eager_ms = tuili_decode_ms(llm, prompt, temperature=0.7, top_p=0.9)
    del graphs.sampler_for
    return dict(shape=name, case="batch-1 decode, top_p 0.9, temperature 0.7", unit="ms/token",
                tuili=ms, hf=None, speedup=None, tuili_eager_sampling=eager_ms, tuili_greedy=greedy,
                roofline=f"greedy {greedy:.3f} ms; sampling launched eagerly {eager_ms:.3f} ms")


def replay_ms(llm: LLM) -> tuple[float, int]:
    """The batch-1 decode graph replayed alone over the inputs of the last decode step (whose
    request has finished: its KV slot is written again, nothing reads it), and that step's context
    length. Free of host noise, so two contexts' replays give attention's share of a step."""
    graphs = llm.engine.runner.graphs
    return cuda_time(graphs.graphs[1].replay, repeat=50) * 1e3, int(graphs.inputs[1][3, 0])


def tuili_ttft_ms(llm: LLM, prompts: list[list[int]], prefill_graphs: bool = True) -> float:
    """Median time to first token; prefill_graphs=False runs the prefills eagerly. (The graphs
    are held only in this frame meanwhile: a reference left in the caller would keep the whole
    engine, KV cache included, alive after it is deleted.)"""
    runner = llm.engine.runner
    graphs = runner.prefill_graphs
    if not prefill_graphs:
        runner.prefill_graphs = None
    times = []
    for p in prompts:
        start = now()
        llm.generate([p], SamplingParams(temperature=0, max_tokens=1))
        times.append(now() - start)
    runner.prefill_graphs = graphs
    return sorted(times)[len(times) // 2] * 1e3


def arrival(llm: LLM, vocab: int, trials: int = 5, mixed_graphs: bool = True) -> tuple[float, float]:
    """A 128-token prompt arriving while 3 streams decode: its time to first token and the
    longest gap between the first stream's tokens around it (ms, medians of `trials`).
    mixed_graphs=False runs the step that holds the prompt and the decodes eagerly (prefill
    graphs only for steps without decodes, as before they took decodes)."""
    eng = llm.engine
    graphs = eng.runner.prefill_graphs
    if not mixed_graphs:
        graphs.fits = lambda n, seqs, rows=0: seqs == 1 and type(graphs).fits(graphs, n, seqs, rows)
    g = torch.Generator().manual_seed(0)
    results = []
    for k in range(trials):
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        for i in range(3):
            prompt = torch.randint(2, vocab, (40,), generator=g).tolist()
            eng.add_request(f"s{k}.{i}", prompt, params)
        stamps, firsts = [], []

        def step():  # stamps the first stream's tokens and the new prompt's
            for o in eng.step():
                if o.request_id == f"s{k}.0":
                    stamps.append(now())
                if o.request_id == f"n{k}" and o.outputs[0].token_ids:
                    firsts.append(now())

        for _ in range(30):
            step()
        start = now()
        eng.add_request(f"n{k}", torch.randint(2, vocab, (128,), generator=g).tolist(),
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        for _ in range(12):
            step()
        ttft = firsts[0] - start
        for rid in [f"s{k}.{i}" for i in range(3)] + [f"n{k}"]:
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()
        results.append((ttft * 1e3, max(b - a for a, b in zip(stamps, stamps[1:])) * 1e3))
    if not mixed_graphs:
        del graphs.fits
    return tuple(sorted(r[i] for r in results)[trials // 2] for i in (0, 1))


def tuili_throughput(llm: LLM, prompts: list[list[int]], outs: list[int]) -> tuple[float, float]:
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    start = now()
    results = llm.generate(prompts, params)
    wall = now() - start
    assert sum(len(r.outputs[0].token_ids) for r in results) == sum(outs)
    return wall, sum(outs) / wall


def attention_share(name: str, replays: dict, kv_tok: int, layers: int, bw: float) -> dict:
    """Decode attention inside the model: what the longer context adds to a batch-1 graph replay
    (only attention reads more) against the extra K/V bytes it reads. Alone in a graph the kernel
    also shows its ramp-up and drain, which in the model overlap the kernels beside it (PDL)."""
    (short, short_ctx), (long, long_ctx) = replays["decode128"], replays["decode8k"]
    extra_bytes = (long_ctx - short_ctx) * kv_tok
    us = (long - short) * 1e3 / layers
    return dict(shape=name, case="decode attention in the step, 8k vs 128 keys", unit="us/layer",
                tuili=us, hf=None, speedup=None,
                roofline=f"{extra_bytes / ((long - short) / 1e3) / bw:.0%} of read bandwidth "
                         f"({extra_bytes / layers / 1e6:.1f} MB a layer; replays {short:.3f} ms at "
                         f"{short_ctx} keys, {long:.3f} ms at {long_ctx})")


# ---- one shape ---------------------------------------------------------------------------------

def run_shape(name: str, ceilings: dict) -> list[dict]:
    cfg = SHAPES[name][2]
    vocab = cfg["vocab_size"]
    bw, peak = ceilings["read_bytes_per_s"], ceilings["matmul_flops_per_s"]
    rng = random.Random(1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        hf = build(name, Path(tmp), num_layers=FULL_LAYERS[name])
        config, params = hf.config, linear_params(hf)
        kv_tok = kv_bytes_per_token(config)
        print(f"{name}: built and saved in {time.perf_counter() - start:.0f}s", flush=True)
        prompts = {"decode128": random_prompt(rng, vocab, 128),
                   "decode8k": random_prompt(rng, vocab, 8192 - DECODE_TOKENS),
                   **{f"ttft{n}": [random_prompt(rng, vocab, n) for _ in range(5)]
                      for n in (128, 2048)}}
        hf_results = {}
        for case in CASES[name]:
            if case == "arrival":  # tuili alone
                continue
            if case == "decode128":
                linears_ms = cublas_linears_ms(hf)
                print(f"  cuBLAS linears alone: {linears_ms:.3f} ms", flush=True)
            if case.startswith("decode"):
                hf_results[case] = hf_decode_ms(hf, prompts[case])
            elif case.startswith("ttft"):
                hf_results[case] = hf_ttft_ms(hf, prompts[case])
            else:
                ps, outs = workload(case, vocab)
                n = 32 if name == "llama3-8b" else 64
                hf_results[case] = hf_throughput(hf, ps[:n], outs[:n])
            print(f"  HF {case}: {hf_results[case]:.2f}", flush=True)
        del hf
        gc.collect()
        torch.cuda.empty_cache()

        llm = LLM(tmp, dtype="bfloat16", device="cuda", max_model_len=8192)  # default options
        replays = {}
        for case in CASES[name]:
            hf_value = hf_results.get(case)
            if case == "arrival":
                ttft, gap = arrival(llm, vocab)
                eager_ttft, eager_gap = arrival(llm, vocab, mixed_graphs=False)
                rows.append(dict(shape=name, case="128-token prompt beside 3 streams: TTFT",
                                 unit="ms", tuili=ttft, hf=None, speedup=None,
                                 tuili_eager_mixed=eager_ttft,
                                 roofline=f"mixed step eager: {eager_ttft:.2f} ms"))
                rows.append(dict(shape=name, case="... the streams' longest token gap",
                                 unit="ms", tuili=gap, hf=None, speedup=None,
                                 tuili_eager_mixed=eager_gap,
                                 roofline=f"mixed step eager: {eager_gap:.2f} ms"))
            elif case.startswith("decode"):
                ctx = len(prompts[case]) + DECODE_TOKENS // 2
                ms = tuili_decode_ms(llm, prompts[case])
                floor = (params * 2 + ctx * kv_tok) / bw * 1e3
                rows.append(dict(shape=name, case=f"batch-1 decode, ~{ctx} context", unit="ms/token",
                                 tuili=ms, hf=hf_value, speedup=hf_value / ms,
                                 roofline=f"{floor / ms:.0%} of read bandwidth (floor {floor:.2f} ms)"))
                replays[case] = replay_ms(llm)
                rows[-1].update(replay_ms=replays[case][0], replay_context=replays[case][1])
                if case == "decode128":
                    rows[-1].update(cublas_linears_ms=linears_ms)
                    rows[-1]["roofline"] += f"; cuBLAS linears alone {linears_ms:.2f} ms"
                    rows.append(sampled_decode(name, llm, prompts[case]))
                if case == "decode8k" and "decode128" in replays:
                    rows.append(attention_share(name, replays, kv_tok, config.num_hidden_layers, bw))
            elif case.startswith("ttft"):
                n = len(prompts[case][0])
                ms = tuili_ttft_ms(llm, prompts[case])
                eager_ms = tuili_ttft_ms(llm, prompts[case], prefill_graphs=False)
                flops = 2 * params * n + attention_flops(config, n, 0)
                rows.append(dict(shape=name, case=f"time to first token, {n}-token prompt",
                                 unit="ms", tuili=ms, hf=hf_value, speedup=hf_value / ms,
                                 tuili_eager_prefill=eager_ms,
                                 roofline=f"{flops / (ms / 1e3) / peak:.0%} of matmul rate; "
                                          f"eager prefill {eager_ms:.2f} ms"))
            else:
                ps, outs = workload(case, vocab)
                wall, rate = tuili_throughput(llm, ps, outs)
                flops = sum(2 * params * (len(p) + o) + attention_flops(config, len(p) + o, 0)
                            for p, o in zip(ps, outs))
                hf_wall = sum(outs) / hf_value
                rows.append(dict(shape=name, case=f"{case}: wall s (output tok/s)", unit="s",
                                 tuili=wall, hf=hf_wall, speedup=hf_wall / wall,
                                 tuili_tok_s=rate, hf_tok_s=hf_value,
                                 roofline=f"{flops / wall / peak:.0%} of matmul rate"))
            print(f"  tuili {rows[-1]['case']}: {rows[-1]['tuili']:.2f}", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,qwen3-0.6b,llama3-8b")
    p.add_argument("--json")
    args = p.parse_args()
    ceilings = measure_ceilings()
    print(f"ceilings: read {ceilings['read_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    rows = [r for name in args.shapes.split(",") for r in run_shape(name, ceilings)]
    print(f"\n{'shape':<13} {'case':<44} {'tuili':>9} {'HF':>9} {'HF/tuili':>8}  roofline")
    for r in rows:
        extra = (f" ({r['tuili_tok_s']:.0f} vs {r['hf_tok_s']:.0f} tok/s)" if "tuili_tok_s" in r
                 else "")
        hf = f"{r['hf']:9.2f} {r['speedup']:7.1f}x" if r["hf"] is not None else f"{'-':>9} {'':8}"
        print(f"{r['shape']:<13} {r['case']:<44} {r['tuili']:9.2f} {hf}  {r['roofline']}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
