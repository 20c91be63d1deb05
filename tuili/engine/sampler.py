"""Logits -> tokens for a batch: penalties, min_tokens, structured-output masks, temperature,
top-k/p, min-p, seeds, logprobs.

Random rows draw by a race: the argmax of the scaled logits plus independent noise (Gumbel on the
GPU, in triton_sampling; on the CPU, the equivalent argmax of p / q with q ~ Exp(1)), which draws
from the filtered softmax exactly. A request with a seed draws its noise from that seed and the
number of tokens it has, so its tokens do not depend on what else is in the batch. Nothing here
waits for the GPU: the tokens stay on the device (the next step reads them there) and reach the
host when SampledTokens.resolve() is called. On the GPU a decode step's sampling can replay a CUDA
graph (`graph`, from the decode graphs) when no row needs penalties or min_tokens.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from typing import Callable

import torch

from tuili.engine.request import Logprob, Request
from tuili.engine.transfer import HostCopy, to_device
from tuili.sampling_params import SamplingParams
from tuili.structured.mask import StepMask
from tuili.kernels import HAS_TRITON, on_gpu, triton_module


@dataclass
class SampledTokens:
    """One step's sampled tokens, row i for the i-th request sampled."""
    tokens: torch.Tensor  # [rows] on the device
    host: HostCopy
    logprob_rows: list[int]  # rows that asked for logprobs, with how many alternatives each
    logprob_top: list[int]
    logprob_parts: list[HostCopy]  # chosen, ranks, top values, top ids of those rows

    def resolve(self) -> tuple[list[int], list[Logprob | None]]:
        """The tokens (and logprobs) as Python values; waits for the GPU if it is not done."""
        tokens = self.host.get().tolist()
        logprobs: list[Logprob | None] = [None] * len(tokens)
        if self.logprob_rows:
            parts = [p.get().tolist() for p in self.logprob_parts]
            found = as_logprobs([tokens[i] for i in self.logprob_rows], *parts)
            for i, n, lp in zip(self.logprob_rows, self.logprob_top, found):
                lp.top = lp.top[:n]
                logprobs[i] = lp
        return tokens, logprobs


# Per-row parameters as the GPU path takes them: floats (1 / temperature, top_p, min_p) and ints
# (top_k, seed), one list per field, and how many candidates to rank.
RowParams = tuple[list[list[float]], list[list[int]], int]
# (floats, ints, width[, the step's grammar bitmask on the device]) -> tokens
GraphSample = Callable[..., torch.Tensor]


@dataclass
class SamplingBatch:
    """What one step's rows ask of the sampler, gathered once: the sampled requests and their
    parameters, whether all are greedy, whether any needs penalties, the logits to mask (stop
    tokens before min_tokens, except where the step's grammar allows only them), the step's
    structured-output mask and the rows that want logprobs. The raw logits serve as they are
    (the graph's argmax, a sampling graph) only when nothing is penalised or masked."""
    requests: list[Request]
    params: list[SamplingParams]
    all_greedy: bool
    penalties: bool
    banned: list[int]  # flat indices row * vocab + token, set to -inf
    logprob_rows: list[int]
    grammar: StepMask | None = None  # the rows' structured-output bitmask

    @classmethod
    def build(cls, reqs: list[Request], vocab: int, mask: StepMask | None = None) -> SamplingBatch:
        params = [r.params for r in reqs]
        # A grammar that allows only a stop token wins over min_tokens: the request ends.
        free = mask.only_stop_rows if mask is not None else ()
        return cls(
            reqs, params, all(p.temperature == 0 for p in params),
            any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                for p in params),
            [i * vocab + t for i, r in enumerate(reqs)
             if r.num_output_tokens < r.params.min_tokens and i not in free
             for t in _stop_ids(r)],
            [i for i, p in enumerate(params) if p.logprobs is not None], mask)

    @property
    def raw_logits_serve(self) -> bool:
        return not (self.penalties or self.banned or self.grammar is not None)


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = random.Random(seed)  # the GPU path's seeds for rows that bring none
        self.gpu = device.type == "cuda" and HAS_TRITON  # the Triton kernels, else torch's

    def __call__(self, logits: torch.Tensor, reqs: list[Request],
                 argmax: torch.Tensor | None = None,
                 graph: GraphSample | None = None, mask: StepMask | None = None) -> SampledTokens:
        """logits: in the model's dtype (cast to float32 only where a row needs more than its
        argmax); argmax: logits.argmax(-1) when the caller has it (the decode graph computes it);
        graph: samples these logits by replaying a CUDA graph, given row_params; mask: the
        structured-output bitmask of the rows (applied inside the graph when one samples)."""
        batch = SamplingBatch.build(reqs, logits.shape[1], mask)
        raw = logits
        if (mask is not None and self.gpu and graph is not None and not batch.penalties
                and not batch.banned):  # the graph's masked twin: mask, argmax and sample
            tokens = graph(*self.row_params(reqs, logits.shape[1]), mask.bitmask)
            return self._sampled(raw, tokens, batch)
        if batch.penalties:
            logits = apply_penalties(logits.to(torch.float32, copy=True), reqs)
        if batch.banned:  # flat indices into the rows: one fill for the batch
            logits = logits.to(torch.float32, copy=True) if logits is raw else logits
            logits.view(-1).index_fill_(0, to_device(batch.banned, torch.long, logits.device),
                                        float("-inf"))
        if batch.grammar is not None:
            logits = logits.to(torch.float32, copy=True) if logits is raw else logits
            batch.grammar.apply(logits)
        as_raw = batch.raw_logits_serve
        if batch.all_greedy:
            tokens = argmax if argmax is not None and as_raw else row_argmax(logits)
        elif self.gpu and graph is not None and as_raw:
            tokens = graph(*self.row_params(reqs, logits.shape[1]))
        elif self.gpu:
            tokens = self._sample_gpu(logits, reqs, argmax if as_raw else None)
        else:
            tokens = self._sample(logits, reqs)
        return self._sampled(raw, tokens, batch)

    @staticmethod
    def _sampled(raw: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> SampledTokens:
        """The tokens, with the logprobs their rows asked for (of the raw logits)."""
        wanted, params = batch.logprob_rows, batch.params
        parts = []
        if wanted:
            rows = to_device(wanted, torch.long, raw.device)
            top_n = max(params[i].logprobs for i in wanted)
            parts = [HostCopy(t) for t in logprob_tensors(raw[rows], tokens[rows], top_n)]
        return SampledTokens(tokens, HostCopy(tokens), wanted,
                             [params[i].logprobs for i in wanted], parts)

    def row_params(self, reqs: list[Request], vocab: int) -> RowParams:
        """The GPU path's per-row parameters (see triton_sampling.sample) and candidate width:
        1 without filters, CANDIDATES when every filtered row has a top_k within it, else the
        whole vocabulary (sorted)."""
        params = [r.params for r in reqs]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p if p.top_p < 1 else 2.0 for p in params]
        floats = [[1 / p.temperature if p.temperature else 0.0 for p in params], top_p,
                  [p.min_p for p in params]]
        seeds = [self.rng.getrandbits(63) if r.seed is None
                 else draw_seed(r.seed, r.num_output_tokens) for r in reqs]
        filtered = [(k, pp) for k, pp, p in zip(top_k, top_p, params)
                    if p.temperature and (k < vocab or pp < 1)]
        width = 1
        if filtered:
            fits = all(k <= CANDIDATES for k, _ in filtered)
            width = min(vocab, CANDIDATES) if fits else vocab
        return floats, [top_k, seeds], width

    def _sample_gpu(self, logits: torch.Tensor, reqs: list[Request],
                    argmax: torch.Tensor | None) -> torch.Tensor:
        floats, ints, width = self.row_params(reqs, logits.shape[1])
        f = to_device(floats, torch.float32, logits.device)
        i = to_device(ints, torch.long, logits.device)
        greedy = argmax if argmax is not None else row_argmax(logits)
        return sample_on_gpu(logits, greedy, f, i, width)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The torch path (the CPU's)."""
        probs = filtered_probs(logits, [r.params for r in reqs])
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.seed is not None:
                own = torch.Generator(device=q.device).manual_seed(
                    draw_seed(r.seed, r.num_output_tokens))
                q[i].exponential_(generator=own)
        greedy = to_device([r.params.temperature == 0 for r in reqs], torch.bool, logits.device)
        return torch.where(greedy, row_argmax(logits), row_argmax(probs / q))


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's distribution after temperature (0 counts as 1), top-k, top-p and min-p: what
    the torch path draws from, and the GPU kernels' reference."""
    device = logits.device
    temps = to_device([p.temperature or 1.0 for p in params], torch.float32, device)
    logits = logits.float() / temps[:, None]
    if any(p.top_k or p.top_p < 1 for p in params):
        logits = top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs


def sample_on_gpu(logits: torch.Tensor, greedy: torch.Tensor, floats: torch.Tensor,
                  ints: torch.Tensor, width: int) -> torch.Tensor:
    """triton_sampling.sample over row_params as device tensors ([3, rows] float32: 1 /
    temperature, top_p, min_p; [2, rows] int64: top_k, seed)."""
    return triton_module("triton_sampling").sample(logits, greedy, floats[0], ints[0], floats[1],
                                                   floats[2], ints[1], width)


def draw_seed(seed: int, step: int) -> int:
    """A 63-bit seed for a seeded request's draw at output position `step` (splitmix64 of both)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


def row_argmax(x: torch.Tensor, also: torch.Tensor | None = None) -> torch.Tensor:
    """x.argmax(-1) of a [rows, V] float tensor; on the GPU in parallel chunks of each row.
    also: a second tensor to write the result to (in the same launch on the GPU)."""
    if on_gpu(x) and x.stride(-1) == 1:
        return triton_module("triton_sampling").argmax(x, also)
    if not x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        # The same index (the values exactly, the first of equal ones): torch's CPU argmax over
        # 16-bit floats took 0.26 ms of SmolLM2's 49,152 logits, the float32 copy and its
        # argmax 0.04 (one thread, 2-core VM).
        x = x.float()
    out = x.argmax(dim=-1)
    if also is not None:
        also.copy_(out)
    return out


def _stop_ids(req: Request) -> list[int]:
    ids = set(req.params.stop_token_ids)
    if not req.params.ignore_eos:
        ids |= req.eos_token_ids
    return sorted(ids)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Repetition penalty over prompt and output (HF's rule); presence/frequency over output."""
    B, V = logits.shape
    device = logits.device
    # Every request's tokens in one flat copy each, rows repeated on the device: a few launches
    # for the whole batch, not two per request.
    outputs, everything, counts = array("q"), array("q"), []
    for r in reqs:
        out = r.output_token_ids
        outputs.extend(out)
        everything.extend(r.token_ids)
        counts += [len(out), len(r.token_ids)]
    # Flat indices row * V + token (index_put_ with accumulate would wait for the GPU; the
    # flat index_add_ and index_fill_ do not).
    sizes = to_device(counts, torch.long, device).view(B, 2)
    batch_rows = torch.arange(B, device=device) * V
    out_flat = batch_rows.repeat_interleave(sizes[:, 0], output_size=len(outputs))
    out_flat += to_device(outputs, torch.long, device)
    all_flat = batch_rows.repeat_interleave(sizes[:, 1], output_size=len(everything))
    all_flat += to_device(everything, torch.long, device)
    out_counts = torch.zeros(B * V, device=device).index_add_(
        0, out_flat, torch.ones(len(outputs), device=device)).view(B, V)
    seen = torch.zeros(B * V, dtype=torch.bool, device=device).index_fill_(0, all_flat, True)
    seen = seen.view(B, V)
    rep = to_device([r.params.repetition_penalty for r in reqs], torch.float32, device)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = to_device([r.params.frequency_penalty for r in reqs], torch.float32, device)[:, None]
    pres = to_device([r.params.presence_penalty for r in reqs], torch.float32, device)[:, None]
    return logits - freq * out_counts - pres * (out_counts > 0).float()


# Candidates ranked with topk before a full sort of the vocabulary is needed.
CANDIDATES = 1024


def top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                may_wait: bool | None = None) -> torch.Tensor:
    """Mask all but each row's top_k tokens (0 = all) and, of those, its smallest set holding
    top_p of their probability. Only the best max(top_k) tokens, or CANDIDATES when a row
    has no top_k, are ranked (topk, no full sort). A row with top_p but no top_k may need more
    than its candidates; whether it does is known only on the device. On the CPU (may_wait) the
    answer is read and a full sort runs only when needed. On the GPU (where this serves as the
    kernels' reference: the engine samples there in triton_sampling) reading it would make the
    host wait, so such rows take the full sort at once."""
    B, V = logits.shape
    k = [kk if 0 < kk < V else V for kk in top_k]
    open_top_p = any(kk == V and pp < 1 for kk, pp in zip(k, top_p))
    may_wait = not logits.is_cuda if may_wait is None else may_wait
    p = to_device([pp if pp < 1 else 2.0 for pp in top_p], torch.float32, logits.device)[:, None]
    if open_top_p and not may_wait:
        return top_k_top_p_sorted(logits, k, p)
    width = min(V, max(min(kk, CANDIDATES) if kk == V else kk for kk in k))
    values, order = logits.topk(width, dim=-1) if width < V else logits.sort(-1, descending=True)
    rank = torch.arange(width, device=logits.device)[None, :]
    drop = rank >= to_device(k, torch.long, logits.device)[:, None]
    values = values.masked_fill(drop, float("-inf"))
    # Each row's probabilities over its top_k set, normalised over the whole set even where only
    # part of it is among the candidates.
    full_k = to_device([kk == V for kk in k], torch.bool, logits.device)[:, None]
    norm = torch.where(full_k, logits.logsumexp(-1, keepdim=True), values.logsumexp(-1, keepdim=True))
    probs = (values - norm).exp()
    if (width < V and open_top_p
            and bool(((probs.sum(-1, keepdim=True) < p) & full_k & (p <= 1)).any())):
        return top_k_top_p_sorted(logits, k, p)
    # Drop a token when the tokens ranked above it already hold top_p of the mass.
    drop |= (probs.cumsum(dim=-1) - probs) >= p
    values = values.masked_fill(drop, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter(-1, order, values)
    return torch.where(full_k & (p > 1), logits, out)  # rows with neither filter keep every token


def top_k_top_p_sorted(logits: torch.Tensor, k: list[int], p: torch.Tensor) -> torch.Tensor:
    """top_k_top_p over a full sort of each row (the fallback)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= to_device(k, torch.long, logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> list[Logprob]:
    """Per row: the target token's logprob and rank, and the top_n alternatives."""
    parts = [t.tolist() for t in logprob_tensors(logits, targets, top_n)]
    return as_logprobs(targets.tolist(), *parts)


def logprob_tensors(logits: torch.Tensor, targets: torch.Tensor, top_n: int) -> list[torch.Tensor]:
    """On the device: each row's target logprob, its rank, the top_n logprobs and their ids."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, targets[:, None])
    ranks = (lp > chosen).sum(dim=-1) + 1
    top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], targets[:, None][:, :0])
    return [chosen[:, 0], ranks, top_vals, top_ids]


def as_logprobs(targets: list[int], chosen: list[float], ranks: list[int],
                top_vals: list[list[float]], top_ids: list[list[int]]) -> list[Logprob]:
    return [Logprob(t, c, r, list(zip(ids, vals)))
            for t, c, r, vals, ids in zip(targets, chosen, ranks, top_vals, top_ids)]
