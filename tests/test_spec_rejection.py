"""Rejection sampling of drafts is lossless: the emitted token follows the target's distribution
exactly (enumerated), and the batched torch implementation matches that law (chi-square)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tuili.engine.request import Request
from tuili.engine.sampler import filtered_probs
from tuili.engine.spec_decode.draft import Draft
from tuili.engine.spec_decode.rejection import rejection_sample
from tuili.engine.spec_decode.verify import verify
from tuili.sampling_params import SamplingParams

V, K = 5, 2


def law_given_drafts(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int]) -> dict:
    """Exact law of the emitted tokens (kept drafts, then one more) for fixed drafts."""
    law, alive = {}, 1.0
    for i, d in enumerate(drafts):
        qi = torch.nn.functional.one_hot(torch.tensor(d), V).double() if q is None else q[i]
        accept = min(1.0, float(p[i, d] / qi[d]))
        residual = (p[i] - qi).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[i]
        for t in range(V):
            seq = tuple(drafts[:i]) + (t,)
            law[seq] = law.get(seq, 0.0) + alive * (1 - accept) * float(residual[t])
        alive *= accept
    for t in range(V):
        seq = tuple(drafts) + (t,)
        law[seq] = law.get(seq, 0.0) + alive * float(p[len(drafts), t])
    return law


def law_of_draft_model(p: torch.Tensor, q: torch.Tensor) -> dict:
    """Exact law of the emitted tokens when the drafts are drawn from q."""
    law = {}
    for drafts in itertools.product(range(V), repeat=K):
        weight = float(q[0, drafts[0]] * q[1, drafts[1]])
        for seq, pr in law_given_drafts(p, q, list(drafts)).items():
            law[seq] = law.get(seq, 0.0) + weight * pr
    return law


def random_dists(g: torch.Generator, rows: int, zero_some: bool = True) -> torch.Tensor:
    x = torch.rand(rows, V, generator=g, dtype=torch.float64) ** 3
    if zero_some:
        x[:, 0] = 0  # a token the distribution rules out
    return x / x.sum(-1, keepdim=True)


def test_emitted_tokens_follow_the_target_exactly():
    g = torch.Generator().manual_seed(0)
    p, q = random_dists(g, K + 1), random_dists(g, K, zero_some=False)
    law = law_of_draft_model(p, q)
    assert sum(law.values()) == pytest.approx(1.0)
    first = [sum(v for s, v in law.items() if s[0] == t) for t in range(V)]
    assert first == pytest.approx(p[0].tolist(), abs=1e-12)
    # the second token, when one is emitted in this step, follows p_1 too
    both = {t: sum(v for s, v in law.items() if len(s) > 1 and s[1] == t) for t in range(V)}
    total = sum(both.values())
    assert [both[t] / total for t in range(V)] == pytest.approx(p[1].tolist(), abs=1e-12)


def chi_square_p(counts: dict, law: dict, n: int) -> float:
    keys = [s for s, v in law.items() if v * n >= 5]
    rare = 1.0 - sum(law[s] for s in keys)
    observed = [counts.get(s, 0) for s in keys] + [n - sum(counts.get(s, 0) for s in keys)]
    expected = [law[s] * n for s in keys] + [rare * n]
    if expected[-1] < 5:  # too rare to test alone: must be (nearly) never seen
        assert observed[-1] <= 5
        observed, expected = observed[:-1], expected[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1  # the chi-square survival function: Q(dof / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def test_batched_rejection_sampling_matches_the_law():
    g = torch.Generator().manual_seed(1)
    p, q = random_dists(g, K + 1).float(), random_dists(g, K, zero_some=False).float()
    n = 40000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).T  # [n, K]
    probs = p.repeat(n, 1)
    offsets = torch.arange(n) * (K + 1)
    kept, final = rejection_sample(
        probs, offsets, torch.full((n,), K), drafts, q.expand(n, K, V).contiguous(),
        torch.rand(n, K, generator=g), torch.empty(n, K + 1, V).exponential_(generator=g))
    counts = {}
    for d, a, f in zip(drafts.tolist(), kept.tolist(), final.tolist()):
        seq = tuple(d[:a]) + (f,)
        counts[seq] = counts.get(seq, 0) + 1
    assert chi_square_p(counts, law_of_draft_model(p.double(), q.double()), n) > 1e-3


def test_verify_with_ngram_drafts_and_filters_follows_the_target():
    """The engine's verify (temperature, top-k on each row) against the exact law of one-hot
    drafts over the filtered target distributions."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(K + 1, V, generator=g) * 2
    params = SamplingParams(temperature=0.7, top_k=3, max_tokens=10)
    drafts = [int(logits[0].argmax()), int(logits[1].argsort()[-2])]
    n = 20000
    reqs = []
    for i in range(n):
        r = Request(f"r{i}", [1, 2, 3], params, frozenset())
        r.draft = Draft(list(drafts))
        reqs.append(r)
    found = verify(logits.repeat(n, 1), reqs, torch.Generator().manual_seed(3))
    counts = {}
    for v in found:
        counts[tuple(v.tokens)] = counts.get(tuple(v.tokens), 0) + 1
    p = filtered_probs(logits, [params] * (K + 1)).double()
    assert chi_square_p(counts, law_given_drafts(p, None, drafts), n) > 1e-3


def test_greedy_rows_keep_exactly_the_matching_drafts():
    logits = torch.tensor([[0.0, 3, 1, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 9.0]])
    r = Request("g", [1], SamplingParams(temperature=0, max_tokens=10), frozenset())
    r.draft = Draft([1, 2])  # the first matches the argmax, the second does not (0 is)
    (v,) = verify(logits, [r], torch.Generator().manual_seed(0))
    assert (v.kept, v.tokens) == (1, [1, 0])
    r.draft = Draft([1, 0])
    (v,) = verify(logits, [r], torch.Generator().manual_seed(0))
    assert (v.kept, v.tokens) == (2, [1, 0, 4])


def test_seeded_verify_draws_do_not_depend_on_the_batch():
    logits = torch.randn(K + 1, V, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10)

    def run(others: int) -> list[int]:
        reqs = [Request(f"x{i}", [1, 2], SamplingParams(temperature=1.0, max_tokens=10),
                        frozenset()) for i in range(others)]
        reqs.append(Request("s", [1, 2], params, frozenset(), seed=7))
        for r in reqs:
            r.draft = Draft([1, 2])
        return verify(logits.repeat(len(reqs), 1), reqs, torch.Generator())[-1].tokens

    assert all(run(0) == run(m) for m in (1, 3)) and run(2) == run(0)
