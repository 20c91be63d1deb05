"""Structured output on the GPU: the bitmask kernel against its torch reference (bf16 and
float32, a 128k vocabulary); the decode graphs' masked sampling twins give the eager path's
tokens (greedy and seeded) without a host sync and leave the raw logits (logprobs) alone; and an
engine on a random SmolLM2-shaped model with a 49k vocabulary built offline keeps every output
inside the schema through the graphs, greedy and sampled, as eagerly."""

import gc
import json

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("xgrammar")

from tuili import LLM, SamplingParams  # noqa: E402
from tuili.engine.request import Request  # noqa: E402
from tuili.engine.sampler import Sampler  # noqa: E402
from tuili.kernels import reference, triton_bitmask  # noqa: E402
from tuili.structured import StructuredOutputs  # noqa: E402
from tuili.structured.mask import StepMask  # noqa: E402

from .random_models import build_with_vocabulary  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["colour", "n", "tags"], "additionalProperties": False}


def valid(text: str) -> bool:
    """SCHEMA checked by hand (jsonschema is not on the GPU machine)."""
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"colour", "n", "tags"}
            and v["colour"] in ("red", "green", "blue")
            and type(v["n"]) is int and 0 <= v["n"] <= 99 and isinstance(v["tags"], list)
            and len(v["tags"]) <= 3
            and all(isinstance(t, str) and len(t) <= 6 for t in v["tags"]))


def random_bitmask(rows: int, vocab: int) -> torch.Tensor:
    bits = torch.randint(0, 2 ** 32, (rows, (vocab + 31) // 32), dtype=torch.int64)
    mask = bits.to(torch.int32)
    mask[0] = -1
    if rows > 1:
        mask[1] = 0
        mask[1, 100] = -(1 << 31)  # one allowed token, on the sign bit: 3231
    return mask.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_reference_on_a_128k_vocabulary(dtype):
    torch.manual_seed(0)
    vocab = 128256
    mask = random_bitmask(5, vocab)
    logits = torch.randn(5, vocab, device="cuda").to(dtype)
    want = logits.clone()
    reference.apply_bitmask(want, mask)
    got = logits.clone()
    triton_bitmask.apply_bitmask(got, mask)
    assert torch.equal(got, want)
    assert torch.isfinite(got[1]).nonzero().flatten().tolist() == [3231]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-shape")
    build_with_vocabulary("smollm2-135m", path, num_layers=2)
    gc.collect()
    torch.cuda.empty_cache()
    return path


@pytest.fixture(scope="module")
def graphed(folder):
    llm = LLM(str(folder), max_num_seqs=8, kv_cache_memory_gb=1)
    assert llm.engine.runner.graphs is not None
    yield llm
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def requests(n: int, greedy_rows: int) -> list[Request]:
    reqs = []
    for i in range(n):
        params = SamplingParams(temperature=0 if i < greedy_rows else 0.9, top_k=50 * (i % 2),
                                seed=100 + i, logprobs=2 if i == 0 else None)
        reqs.append(Request(f"r{i}", [5, 6, 7], params, frozenset({49151}), params.seed))
    return reqs


@torch.inference_mode()
def test_masked_graph_samples_as_eagerly(graphed):
    graphs = graphed.engine.runner.graphs
    vocab = 49152
    for n in (1, 3, 8):
        torch.manual_seed(n)
        size = next(s for s in graphs.sizes if s >= n)
        raw = graphs.logits[size][:n]
        raw.copy_(torch.randn(n, vocab, device="cuda") * 3)
        graphs.argmax[size][:n].copy_(raw.float().argmax(-1))
        mask = StepMask(random_bitmask(n, vocab), set())
        reqs = requests(n, greedy_rows=(n + 1) // 2)
        before = raw.clone()
        want = Sampler(0, torch.device("cuda"))(raw.clone(), reqs, None, None, mask)
        sampler = Sampler(0, torch.device("cuda"))
        sampler(raw, reqs, graphs.argmax[size][:n], graphs.sampler_for(n), mask)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = sampler(raw, reqs, graphs.argmax[size][:n], graphs.sampler_for(n), mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens, logprobs = got.resolve()
        assert tokens == want.resolve()[0]
        allowed = raw.clone()
        reference.apply_bitmask(allowed, mask.bitmask)
        assert all(torch.isfinite(allowed[i, t]) for i, t in enumerate(tokens))
        assert torch.equal(raw, before)  # the graph masked a copy: logprobs see raw logits
        assert logprobs[0] is not None and len(logprobs[0].top) == 2


def test_engine_keeps_the_schema_through_the_graphs(graphed, folder, monkeypatch):
    graphs = graphed.engine.runner.graphs
    replays = []

    class Counted:  # counts the masked twins' replays
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            replays.append(1)
            self.graph.replay()

    for key, graph in list(graphs.sample_graphs.items()):
        if key[2]:
            monkeypatch.setitem(graphs.sample_graphs, key, Counted(graph))
    so = StructuredOutputs(json=SCHEMA)
    prompts = [graphed.tokenizer.encode(f"Describe item {i} as JSON: ") for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=256, structured_outputs=so)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=3, max_tokens=256,
                             structured_outputs=so)
    for params in (greedy, sampled):
        outs = graphed.generate(prompts, params)
        texts = [o.outputs[0].text for o in outs]
        assert all(valid(t) for t in texts), texts
        assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert replays, "constrained decode steps never replayed a masked sampling graph"
    eager = LLM(str(folder), max_num_seqs=8, enforce_eager=True, kv_cache_memory_gb=1)
    assert all(valid(o.outputs[0].text) for o in eager.generate(prompts, sampled))
