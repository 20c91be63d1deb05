"""Token choice on the GPU.

argmax: each row's greedy token, first index on ties (as torch.argmax). torch's argmax runs one
block per row: 28 us for a 128k vocabulary on an H100. Here each row is cut into chunks that reduce
in parallel, and the last chunk of a row to finish picks the best chunk, in the same launch. Logits
may be 16-bit (compared exactly as torch compares their float32 copies). Reference: torch.argmax.

sample: a random token per row under temperature, top-k, top-p and min-p, drawn by the Gumbel-max
race (the argmax of logit / T + G, G ~ Gumbel(0, 1), is a draw from softmax(logit / T)). The noise
comes from Philox keyed by the row's seed and the token id, so a row's draw depends on its seed
alone: not on the batch, on how the candidates were found, or on CUDA graph replays. Rows with a
top-k or top-p filter walk their candidates in order (`nucleus`): the top k from topk, or for a
top-p nucleus with no top-k the whole row, sorted; rows with no filter race over the whole row,
chunked as argmax is. No launch waits for the host, so a CUDA graph can hold them all.
Reference: tuili.engine.sampler.filtered_probs (the torch path's distribution).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuili.kernels import arrival_counters

CHUNK = 4096
MAX_ROWS = 4096  # rows one launch serves: one arrival counter each
NUCLEUS_BLOCK = 4096  # candidates a nucleus program takes at a time


@triton.jit
def _gumbel(seed, tokens):
    """Gumbel(0, 1) noise for `tokens` from Philox under `seed`: u is strictly inside (0, 1) (24
    random bits, centred), so -log(-log(u)) is always finite."""
    bits = tl.randint(seed, tokens).to(tl.uint32, bitcast=True) >> 8
    u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _argmax_kernel(x_ptr, val_ptr, idx_ptr, ticket_ptr, out_ptr, also_ptr, inv_t_ptr, floor_ptr,
                   seed_ptr, top_ptr, V, stride_x, CHUNKS, CHUNK: tl.constexpr,
                   CHUNKS_PAD: tl.constexpr, ALSO: tl.constexpr, RACE: tl.constexpr):
    """RACE 0: argmax. 1: the race above each row's floor. 2: the race above the floor that
    min_p (at floor_ptr) sets below the row's top logit (its argmax at top_ptr)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    floor = float("-inf")
    if RACE == 1:  # rows whose floor is +inf were sampled elsewhere: every chunk leaves
        floor = tl.load(floor_ptr + row)
    if RACE == 2:  # greedy rows (1 / temperature = 0) are the argmax's: they leave too
        inv_t = tl.load(inv_t_ptr + row)
        min_p = tl.load(floor_ptr + row)
        highest = tl.load(x_ptr + row.to(tl.int64) * stride_x + tl.load(top_ptr + row))
        floor = tl.where(min_p > 0,
                         highest.to(tl.float32) * inv_t + tl.log(tl.maximum(min_p, 1e-30)),
                         float("-inf"))
        floor = tl.where(inv_t == 0, float("inf"), floor)
    if floor < float("inf"):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V,
                    other=float("-inf"))
        if RACE:  # the scaled logits at or above the row's floor, plus Gumbel noise
            s = x.to(tl.float32) * tl.load(inv_t_ptr + row)
            noisy = s + _gumbel(tl.load(seed_ptr + row), cols)
            x = tl.where((cols < V) & (s >= floor), noisy, float("-inf"))
        best = tl.max(x, 0)
        # The first column holding the maximum (the smallest index among ties).
        first = tl.min(tl.where(x == best, cols, V), 0)
        tl.store(val_ptr + row * CHUNKS + chunk, best.to(tl.float32))
        tl.store(idx_ptr + row * CHUNKS + chunk, tl.minimum(first, V - 1))
        # The row's last chunk to arrive picks the best one: every thread's stores above come
        # before the release of the ticket (barrier, then an acq_rel add); it leaves the counter
        # at 0 for the next launch (or graph replay).
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu") == CHUNKS - 1:
            c = tl.arange(0, CHUNKS_PAD)
            vals = tl.load(val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
            top = tl.max(vals, 0)
            pick = tl.minimum(tl.min(tl.where(vals == top, c, CHUNKS_PAD), 0), CHUNKS - 1)
            token = tl.load(idx_ptr + row * CHUNKS + pick)
            tl.store(out_ptr + row, token)
            if ALSO:
                tl.store(also_ptr + row, token)
            tl.store(ticket_ptr + row, 0)


def argmax(x: torch.Tensor, also: torch.Tensor | None = None) -> torch.Tensor:
    """x: [rows, V] float or 16-bit, rows contiguous -> [rows] int64 indices of each row's
    maximum, also written to `also` (int64, contiguous) when given. One launch; launches on one
    device must not overlap (they share counters)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    if also is not None:
        assert also.shape == out.shape and also.dtype == torch.long and also.is_contiguous()
    _row_chunks(x, out, also)
    return out


def _row_chunks(x: torch.Tensor, out: torch.Tensor, also: torch.Tensor | None = None,
                race: tuple[torch.Tensor, ...] | None = None) -> None:
    """The chunked argmax launch: of x itself, or with race = (inv_t, floor, seed) of the Gumbel
    race over each row's scaled logits at or above its floor (rows with floor +inf left out), or
    race = (inv_t, min_p, seed, argmax) of the race above min_p's floor (greedy rows left out)."""
    rows, V = x.shape
    assert x.stride(1) == 1
    if rows > MAX_ROWS:
        raise ValueError(f"argmax of {rows} rows: at most {MAX_ROWS}")
    if rows == 0:
        return
    chunks = triton.cdiv(V, CHUNK)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(rows, chunks, dtype=torch.long, device=x.device)
    tickets = arrival_counters(x.device, "argmax", MAX_ROWS)
    mode = 0 if race is None else len(race) - 2
    inv_t, floor, seed, top = (*race, idx)[:4] if race else (vals, vals, idx, idx)  # unread
    _argmax_kernel[(rows, chunks)](x, vals, idx, tickets, out, also if also is not None else out,
                                   inv_t, floor, seed, top, V, x.stride(0), chunks, CHUNK=CHUNK,
                                   CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)),
                                   ALSO=also is not None, RACE=mode, num_warps=8)


@triton.jit
def _nucleus_kernel(val_ptr, order_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr, top_p_ptr,
                    min_p_ptr, seed_ptr, out_ptr, floor_ptr, BLOCK: tl.constexpr):
    """One row: its candidates' logits `val` (sorted, largest first) and their token ids `order`.
    Writes the row's token, or (no filter) the floor of a race over the whole row."""
    row = tl.program_id(0)
    inv_t = tl.load(inv_t_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    vals = val_ptr + row.to(tl.int64) * stride_c
    order = order_ptr + row.to(tl.int64) * stride_c
    top = tl.load(vals).to(tl.float32) * inv_t
    # min-p keeps tokens of at least min_p times the top probability: a floor on scaled logits.
    min_p = tl.load(min_p_ptr + row)
    floor = tl.where(min_p > 0, top + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    if inv_t == 0:  # greedy: the caller takes the argmax
        tl.store(floor_ptr + row, float("inf"))
    elif (k >= V) & (p > 1):  # no filter: the race over the whole row, above the floor
        tl.store(floor_ptr + row, floor)
    else:
        tl.store(floor_ptr + row, float("inf"))
        # Probabilities are normalised over the top-k set (the whole row without one: then the
        # candidates are the whole row, sorted).
        n = tl.minimum(k, W)
        ranks = tl.arange(0, BLOCK)
        total = 0.0
        for r0 in range(0, n, BLOCK):
            s = tl.load(vals + r0 + ranks, mask=r0 + ranks < n, other=float("-inf"))
            total += tl.sum(tl.exp(s.to(tl.float32) * inv_t - top), 0)
        lse = top + tl.log(total)
        # In rank order, a token stays while the tokens ranked above it hold less than top_p;
        # once they hold top_p, no later token can stay, and the walk stops.
        seed = tl.load(seed_ptr + row)
        mass = 0.0
        best = float("-inf")
        best_token = tl.load(order)
        start = 0
        while (start < n) & (mass < p):
            r = start + ranks
            s = tl.load(vals + r, mask=r < n, other=float("-inf")).to(tl.float32) * inv_t
            prob = tl.exp(s - lse)
            above = mass + tl.cumsum(prob, 0) - prob
            tokens = tl.load(order + r, mask=r < n, other=0)
            keep = (r < n) & (above < p) & (s >= floor)
            score = tl.where(keep, s + _gumbel(seed, tokens.to(tl.int32)), float("-inf"))
            chunk_best = tl.max(score, 0)
            chunk_token = tl.min(tl.where(score == chunk_best, tokens, V), 0)
            if chunk_best > best:
                best = chunk_best
                best_token = chunk_token
            mass += tl.sum(prob, 0)
            start += BLOCK
        tl.store(out_ptr + row, best_token)


def sample(x: torch.Tensor, greedy: torch.Tensor, inv_t: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
           width: int) -> torch.Tensor:
    """x: [rows, V] logits (float or 16-bit, rows contiguous); greedy: their argmax (taken where
    inv_t is 0); per row (all on the device): inv_t = 1 / temperature (0: greedy), top_k (int64;
    V: none), top_p (> 1: none), min_p (0: none), seed (int64, fresh for each draw). width: how
    many candidates to rank (topk; V: a full sort), the same for every row: 1 when no row has a
    filter, else at least every top_k below V, and V when a row has top_p without top_k (its
    nucleus may reach any rank). -> [rows] int64 tokens."""
    rows, V = x.shape
    assert x.stride(1) == 1
    out = torch.empty(rows, dtype=torch.long, device=x.device)
    if rows == 0:
        return out
    if width == 1:  # no filters: one launch
        _row_chunks(x, out, race=(inv_t, min_p, seed, greedy))
        return torch.where(inv_t == 0, greedy, out)
    vals, order = x.sort(-1, descending=True) if width >= V else x.topk(width, dim=-1)
    floor = torch.empty(rows, dtype=torch.float32, device=x.device)
    _nucleus_kernel[(rows,)](vals, order, vals.stride(0), vals.shape[1], V, inv_t, top_k, top_p,
                             min_p, seed, out, floor, BLOCK=NUCLEUS_BLOCK, num_warps=8)
    _row_chunks(x, out, race=(inv_t, floor, seed))
    return torch.where(inv_t == 0, greedy, out)
