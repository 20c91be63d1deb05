"""The sampler queues its work and never waits for the GPU (torch's sync debug mode raises on any
operation that would), for every kind of request parameters; the tokens it queued are valid. The
sampling kernels draw from the torch path's distribution, the same tokens for the same seeds
whatever the candidate width, and in a CUDA graph as eagerly."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tuili import SamplingParams  # noqa: E402
from tuili.engine.request import Request  # noqa: E402
from tuili.engine.sampler import Sampler, filtered_probs  # noqa: E402
from tuili.kernels import triton_sampling  # noqa: E402

VOCAB = 32_000
PARAMS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.7, top_p=0.9),
    "top_k": dict(temperature=1.0, top_k=50),
    "top_k_and_top_p": dict(temperature=1.0, top_k=100, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "penalties": dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5,
                      frequency_penalty=0.3),
    "min_tokens": dict(temperature=0, min_tokens=4, stop_token_ids=[5, 6]),
    "seed": dict(temperature=1.0, seed=11),
    "logprobs": dict(temperature=0, logprobs=5),
}


def request(i: int, params: SamplingParams) -> Request:
    req = Request(f"r{i}", [3 + i, 8, 8, 17], params, frozenset({2}), params.seed)
    req.token_ids.extend([9, 4])  # two output tokens already, for the penalties
    return req


@pytest.mark.parametrize("kinds", [[k] for k in PARAMS] + [list(PARAMS)],
                         ids=lambda kinds: kinds[0] if len(kinds) == 1 else "all")
def test_sampling_never_waits_for_the_gpu(kinds):
    torch.manual_seed(0)
    reqs = [request(i, SamplingParams(max_tokens=8, **PARAMS[k])) for i, k in enumerate(kinds)]
    logits = torch.randn(len(reqs), VOCAB, device="cuda", dtype=torch.bfloat16) * 3
    sampler = Sampler(0, torch.device("cuda"))
    sampler(logits, reqs)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = sampler(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens, logprobs = sampled.resolve()
    assert len(tokens) == len(reqs) and all(0 <= t < VOCAB for t in tokens)
    for row, (req, token, lp) in enumerate(zip(reqs, tokens, logprobs)):
        if req.params.temperature == 0 and not req.params.min_tokens:
            assert token == int(logits[row].float().argmax())
        if req.params.min_tokens:
            assert token not in (2, 5, 6)
        assert (lp is not None) == (req.params.logprobs is not None)


FILTERS = [dict(temperature=0.8), dict(temperature=1.0, top_k=50), dict(temperature=0.7, top_p=0.9),
           dict(temperature=1.0, top_k=200, top_p=0.8), dict(temperature=1.0, min_p=0.05),
           dict(temperature=1.3, top_p=0.95, min_p=0.02), dict(temperature=0)]


def row_tensors(reqs: list[Request], vocab: int, width: int | None = None):
    floats, ints, chosen = Sampler(0, torch.device("cuda")).row_params(reqs, vocab)
    f = torch.tensor(floats, device="cuda")
    i = torch.tensor(ints, device="cuda")
    return (f[0], i[0], f[1], f[2], i[1]), width or chosen


@pytest.mark.parametrize("vocab,scale", [(4096, 2.5), (4096, 0.3), (49152, 1.0)])
def test_kernels_draw_from_the_filtered_distribution(vocab, scale):
    """Many draws of each filter kind (one launch, mixed kinds as in a batch) against the torch
    path's distribution: no token outside its support, and a total variation distance within
    twice what sampling noise alone gives. Flat logits (scale 0.3) make wide nuclei. A token
    tied with the smallest kept logit counts as in the support (two sorts may order ties
    differently)."""
    torch.manual_seed(vocab)
    draws = 20_000 if vocab == 4096 else 1_000
    logits = (torch.randn(vocab, device="cuda") * scale).to(torch.bfloat16)
    params = [SamplingParams(**f) for f in FILTERS]
    reqs = [request(i, p) for i, p in enumerate(params) for _ in range(draws)]
    x = logits.repeat(len(reqs), 1)
    rows, width = row_tensors(reqs, vocab)
    assert width == vocab  # a top_p row without top_k: the whole row, sorted
    greedy, step = x.float().argmax(-1), triton_sampling.MAX_ROWS  # rows a launch serves
    tokens = torch.cat([triton_sampling.sample(x[i:i + step], greedy[i:i + step],
                                               *(r[i:i + step] for r in rows), width)
                        for i in range(0, len(reqs), step)]).view(len(params), draws)
    expected = filtered_probs(logits[None].repeat(len(params), 1), params)
    greedy_rows = torch.tensor([p.temperature == 0 for p in params], device="cuda")
    argmax = torch.nn.functional.one_hot(logits.float().argmax(), vocab).float()
    expected = torch.where(greedy_rows[:, None], argmax, expected)  # temperature 0: the argmax
    for kind, got, ref in zip(FILTERS, tokens, expected):
        floor = logits[ref > 0].min()
        tied = torch.where(logits == floor, ref[logits == floor].max(), ref)
        freq = torch.bincount(got, minlength=vocab).double() / draws
        outside = (freq > 0) & (tied == 0)
        assert not outside.any(), f"{kind}: tokens outside the support"
        tv = min(0.5 * (freq - r / r.sum()).abs().sum() for r in (ref, tied))
        ref = ref / ref.sum()
        noise = 0.5 * (2 / torch.pi) ** 0.5 * (ref * (1 - ref) / draws).sqrt().sum()
        assert tv <= 2 * noise + 2e-3, f"{kind}: total variation {tv:.4f}, noise {noise:.4f}"


def test_kernels_same_seed_same_token_whatever_the_width():
    """A row with top_k draws the same token from topk candidates as from a full sort, and a
    plain row the same from the chunked race whatever filters share its launch."""
    vocab = 32_000
    torch.manual_seed(1)
    reqs = [request(i, SamplingParams(temperature=1.0, top_k=k, top_p=p, seed=100 + i))
            for i, (k, p) in enumerate([(50, 1.0), (1000, 0.9), (0, 1.0), (7, 0.3)] * 64)]
    x = (torch.randn(len(reqs), vocab, device="cuda") * 3).to(torch.bfloat16)
    greedy = x.float().argmax(-1)
    rows, width = row_tensors(reqs, vocab)
    assert width == 1024
    by_topk = triton_sampling.sample(x, greedy, *rows, width)
    assert torch.equal(triton_sampling.sample(x, greedy, *rows, vocab), by_topk)
    assert torch.equal(triton_sampling.sample(x, greedy, *rows, width), by_topk)  # repeatable
    assert len(set(by_topk[2::4].tolist())) > 32  # the seeds differ, so do the draws


def test_kernels_in_a_cuda_graph_as_eagerly():
    """Captured once over static buffers: each replay with new logits and parameters gives the
    eager launch's tokens, and queues without a host sync."""
    vocab, n = 49152, 8
    torch.manual_seed(2)
    x = torch.zeros(n, vocab, device="cuda", dtype=torch.bfloat16)
    greedy = torch.zeros(n, dtype=torch.long, device="cuda")
    floats = torch.zeros(3, n, device="cuda")
    ints = torch.zeros(2, n, dtype=torch.long, device="cuda")
    args = (x, greedy, floats[0], ints[0], floats[1], floats[2], ints[1])
    graphs = {}
    for width in (1, 1024, vocab):
        triton_sampling.sample(*args, width)  # compiles, allocates the counters
        graphs[width] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[width]):
            out = triton_sampling.sample(*args, width)
        graphs[width] = graphs[width], out
    for round_ in range(3):
        kinds = [FILTERS[(round_ + i) % len(FILTERS)] for i in range(n)]
        reqs = [request(i, SamplingParams(**k, seed=round_ * n + i)) for i, k in enumerate(kinds)]
        rows, width = row_tensors(reqs, vocab)
        x.copy_(torch.randn(n, vocab, device="cuda") * 3)
        greedy.copy_(x.float().argmax(-1))
        floats.copy_(torch.stack([rows[0], rows[2], rows[3]]))
        ints.copy_(torch.stack([rows[1], rows[4]]))
        want = triton_sampling.sample(x, greedy, *rows, width)
        graph, out = graphs[width]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(out, want)
