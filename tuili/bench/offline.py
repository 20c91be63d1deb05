"""`tuili bench`: offline throughput and latency through LLM (with the phase profiler), and the
embedding-lookup microbenchmark."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuili.analysis.report import format_table
from tuili.errors import InvalidParameter
from tuili.sampling_params import SamplingParams


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts drawn uniformly (above the first 256 ids, where special tokens live)."""
    g = torch.Generator().manual_seed(seed)
    low = min(256, vocab - 1)
    return torch.randint(low, vocab, (count, length), generator=g).tolist()


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)


def warm_up(llm) -> None:
    """One short request, so first-call costs stay out of the numbers (and out of the profile)."""
    llm.generate([random_prompts(llm.engine.model_config.vocab_size, 1, 8)[0]], _params(2))
    if llm.engine.profiler is not None:
        llm.engine.profiler.reset()
    if llm.engine.speculator is not None:
        llm.engine.speculator.reset_stats()


def throughput(llm, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """All prompts submitted at once; tokens per second over the whole run."""
    prompts = random_prompts(llm.engine.model_config.vocab_size, num_prompts, input_len, seed)
    start = time.perf_counter()
    outs = llm.generate(prompts, _params(output_len))
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": num_prompts, "seconds": seconds, "prompt_tokens": num_prompts * input_len,
            "output_tokens": generated, "requests_per_s": num_prompts / seconds,
            "output_tokens_per_s": generated / seconds,
            "total_tokens_per_s": (generated + num_prompts * input_len) / seconds}


def latency(llm, batch: int, input_len: int, output_len: int, iters: int = 3, seed: int = 0) -> dict:
    """`batch` requests at once, `iters` times: time to first token and per output token."""
    engine = llm.engine
    ttft, tpot, e2e = [], [], []
    for it in range(iters):
        prompts = random_prompts(engine.model_config.vocab_size, batch, input_len, seed + it)
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"lat-{it}-{i}", p, _params(output_len))
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                if o.outputs[0].delta_token_ids:
                    first.setdefault(o.request_id, now)
                    last[o.request_id] = now
        for rid, t0 in first.items():
            ttft.append(t0 - start)
            e2e.append(last[rid] - start)
            if output_len > 1:
                tpot.append((last[rid] - t0) / (output_len - 1))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"batch": batch, "iters": iters, "ttft_s": mean(ttft), "tpot_s": mean(tpot),
            "e2e_s": mean(e2e), "output_tokens_per_s": batch / mean(tpot) if tpot else 0.0}


# ---- embedding lookup ---------------------------------------------------------------------

@dataclass
class LookupResult:
    tokens: int
    order: str  # "sequential" or "random"
    seconds: float
    bytes_read: int  # table rows (and the ids)
    bytes_written: int

    @property
    def bandwidth(self) -> float:
        return (self.bytes_read + self.bytes_written) / self.seconds


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def embedding_lookup(tokens: list[int], vocab: int = 32000, hidden: int = 4096, dtype: str = "fp32",
                     device: str = "auto", repeats: int = 10, seed: int = 0) -> list[LookupResult]:
    """Best time of an embedding lookup (the row gather F.embedding does, into a preallocated
    output so page faults stay out) of N ids in a [vocab, hidden] table, ids in order and at
    random; each repeat looks up fresh ids, so rows come from memory rather than a warm cache."""
    if dtype not in TORCH_DTYPES:
        raise InvalidParameter("dtype", f"got {dtype!r}, must be one of {', '.join(TORCH_DTYPES)}")
    bad = [n for n in tokens if n < 1]
    if bad:
        raise InvalidParameter("tokens", f"got {bad[0]}, each count must be >= 1")
    dev = pick_device(device)
    table = torch.randn(vocab, hidden, device=dev).to(TORCH_DTYPES[dtype])
    row_bytes = hidden * table.element_size()
    g = torch.Generator().manual_seed(seed)
    results = []
    for n in tokens:
        for order in ("sequential", "random"):
            id_sets = []
            for _ in range(repeats + 1):
                if order == "sequential":
                    start = int(torch.randint(0, vocab, (1,), generator=g))
                    ids = (torch.arange(n) + start) % vocab
                else:
                    ids = torch.randint(0, vocab, (n,), generator=g)
                id_sets.append(ids.to(dev))
            best = float("inf")
            out = F.embedding(id_sets[0], table)  # warm-up, and the output buffer
            for ids in id_sets[1:]:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                torch.index_select(table, 0, ids, out=out)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, time.perf_counter() - t0)
            results.append(LookupResult(n, order, best, n * row_bytes + n * 8, n * row_bytes))
    return results


def format_lookups(results: list[LookupResult], peak_bandwidth: float | None = None) -> str:
    headers = ["tokens", "ids", "rows read", "time us", "GB/s"] + (["of copy BW"] if peak_bandwidth else [])
    rows = []
    for r in results:
        row = [f"{r.tokens:,}", r.order, _bytes(r.bytes_read - 8 * r.tokens),
               f"{r.seconds * 1e6:.1f}", f"{r.bandwidth / 1e9:.2f}"]
        if peak_bandwidth:
            row.append(f"{100 * r.bandwidth / peak_bandwidth:.0f}%")
        rows.append(row)
    return format_table(headers, rows)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} B"
