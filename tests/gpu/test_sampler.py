"""The sampler queues its work and never waits for the GPU (torch's sync debug mode raises on any
operation that would), for every kind of request parameters; the tokens it queued are valid."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tuili import SamplingParams  # noqa: E402
from tuili.engine.request import Request  # noqa: E402
from tuili.engine.sampler import Sampler  # noqa: E402

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
    gen = (torch.Generator(device="cuda").manual_seed(params.seed)
           if params.seed is not None else None)
    req = Request(f"r{i}", [3 + i, 8, 8, 17], params, frozenset({2}), gen)
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
