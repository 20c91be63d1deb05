"""Token choice on the GPU.

argmax: each row's greedy token, first index on ties (as torch.argmax). torch's argmax runs one
block per row, a long serial walk over a 128k vocabulary. Here each row is cut into chunks that reduce
in parallel, and the last chunk of a row to finish picks the best chunk, in the same launch. Logits
may be 16-bit (compared exactly as torch compares their float32 copies). Reference: torch.argmax.

sample: a random token per row under temperature, top-k, top-p and min-p, drawn by the Gumbel-max
race (the argmax of logit / T + G, G ~ Gumbel(0, 1), is a draw from softmax(logit / T)). The noise
comes from Philox keyed by the row's seed and the token id, so a row's draw depends on its seed
alone: not on the batch, on how the candidates were found, or on CUDA graph replays. Rows with a
top-k or top-p filter keep their candidates in rank order (`nucleus`): the top k from topk, or for
a top-p nucleus with no top-k the whole row, sorted; the candidates are cut into chunks, one
launch sums each chunk's mass and the next races within each chunk, knowing the mass ranked above
it, so a long nucleus spreads over the GPU. Rows with no filter race over the whole row, chunked
as argmax is. No launch waits for the host, so a CUDA graph can hold them all.
Reference: tuili.engine.sampler.filtered_probs (the torch path's distribution).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuili.kernels import arrival_counters

CHUNK = 4096
MAX_ROWS = 4096  # rows one launch serves: one arrival counter each
NUCLEUS_BLOCK = 1024  # candidates a nucleus program takes (many programs a row)


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
def _filter_row(val_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr, top_p_ptr, row):
    """A row's candidates (logits, sorted largest first), its top scaled logit, how many
    candidates its top-k keeps, its top_p and whether it walks them (not greedy, has a filter)."""
    inv_t = tl.load(inv_t_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    vals = val_ptr + row.to(tl.int64) * stride_c
    top = tl.load(vals).to(tl.float32) * inv_t
    walks = (inv_t != 0) & ((k < V) | (p <= 1))
    return vals, inv_t, top, tl.minimum(k, W), p, walks


@triton.jit
def _nucleus_mass_kernel(val_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr, top_p_ptr, mass_ptr,
                         CHUNKS, BLOCK: tl.constexpr):
    """Per (row, chunk of BLOCK ranks): the chunk's softmax mass, unnormalised (exp(s - top))."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    vals, inv_t, top, n, p, walks = _filter_row(val_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr,
                                                top_p_ptr, row)
    if walks:
        r = chunk * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(vals + r, mask=r < n, other=float("-inf")).to(tl.float32) * inv_t
        tl.store(mass_ptr + row * CHUNKS + chunk, tl.sum(tl.exp(s - top), 0))


@triton.jit
def _nucleus_kernel(val_ptr, order_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr, top_p_ptr,
                    min_p_ptr, seed_ptr, mass_ptr, best_ptr, token_ptr, ticket_ptr, out_ptr,
                    floor_ptr, CHUNKS, CHUNKS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Per (row, chunk of BLOCK ranks) of the candidates `val` (sorted, largest first) and their
    token ids `order`: the race among the chunk's tokens that the row's filters keep. The row's
    last chunk to arrive writes the row's token. Chunk 0 also writes the floor of a race over
    the whole row: the min-p floor for a row with no other filter, +inf for the rest."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    vals, inv_t, top, n, p, walks = _filter_row(val_ptr, stride_c, W, V, inv_t_ptr, top_k_ptr,
                                                top_p_ptr, row)
    # min-p keeps tokens of at least min_p times the top probability: a floor on scaled logits.
    min_p = tl.load(min_p_ptr + row)
    floor = tl.where(min_p > 0, top + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    if chunk == 0:
        tl.store(floor_ptr + row, tl.where(walks | (inv_t == 0), float("inf"), floor))
    if walks:
        # Probabilities are normalised over the top-k set (the whole row without one: then the
        # candidates are the whole row, sorted). A token stays while the tokens ranked above it
        # hold less than top_p: a chunk whose predecessors hold top_p keeps none.
        c = tl.arange(0, CHUNKS_PAD)
        masses = tl.load(mass_ptr + row * CHUNKS + c, mask=c * BLOCK < n, other=0.0,
                         cache_modifier=".cg")
        total = tl.sum(masses, 0)
        before = tl.sum(tl.where(c < chunk, masses, 0.0), 0) / total
        best = float("-inf")
        best_token = tl.full((), 0, tl.int64) + V
        if (chunk * BLOCK < n) & (before < p):
            lse = top + tl.log(total)
            r = chunk * BLOCK + tl.arange(0, BLOCK)
            s = tl.load(vals + r, mask=r < n, other=float("-inf")).to(tl.float32) * inv_t
            prob = tl.exp(s - lse)
            above = before + tl.cumsum(prob, 0) - prob
            tokens = tl.load(order_ptr + row.to(tl.int64) * stride_c + r, mask=r < n, other=0)
            keep = (r < n) & (above < p) & (s >= floor)
            score = tl.where(keep, s + _gumbel(tl.load(seed_ptr + row), tokens.to(tl.int32)),
                             float("-inf"))
            best = tl.max(score, 0)
            best_token = tl.min(tl.where(score == best, tokens, V), 0)
        tl.store(best_ptr + row * CHUNKS + chunk, best)
        tl.store(token_ptr + row * CHUNKS + chunk, best_token)
        # The row's last chunk to arrive picks the best one (as in _argmax_kernel).
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu") == CHUNKS - 1:
            bests = tl.load(best_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"),
                            cache_modifier=".cg")
            winner = tl.max(bests, 0)
            pick = tl.minimum(tl.min(tl.where(bests == winner, c, CHUNKS_PAD), 0), CHUNKS - 1)
            token = tl.load(token_ptr + row * CHUNKS + pick, cache_modifier=".cg")
            # Rank 0 always stays (nothing ranks above it), so some chunk has a token.
            tl.store(out_ptr + row, tl.minimum(token, V - 1))
            tl.store(ticket_ptr + row, 0)


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
    if rows > MAX_ROWS:
        raise ValueError(f"sample of {rows} rows: at most {MAX_ROWS}")
    vals, order = x.sort(-1, descending=True) if width >= V else x.topk(width, dim=-1)
    block = NUCLEUS_BLOCK
    chunks = triton.cdiv(vals.shape[1], block)
    mass = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    token = torch.empty(rows, chunks, dtype=torch.long, device=x.device)
    floor = torch.empty(rows, dtype=torch.float32, device=x.device)
    args = (vals, vals.stride(0), vals.shape[1], V, inv_t, top_k, top_p)
    _nucleus_mass_kernel[(rows, chunks)](*args, mass, chunks, BLOCK=block, num_warps=4)
    _nucleus_kernel[(rows, chunks)](
        vals, order, *args[1:], min_p, seed, mass, best, token,
        arrival_counters(x.device, "nucleus", MAX_ROWS), out, floor, chunks,
        CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)), BLOCK=block, num_warps=4)
    _row_chunks(x, out, race=(inv_t, floor, seed))
    return torch.where(inv_t == 0, greedy, out)
