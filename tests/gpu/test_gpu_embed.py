"""Embeddings on the GPU: a BERT-base-shaped encoder (random weights, sentence-transformers files)
through LLM.embed against HF transformers' BertModel on the same weights (mean pooling, L2 norm),
in float32 and bf16, batched (the padded layout under the additive key mask, its longest text not
a multiple of 16) and one text at a time; the ops an embed call issues outside the forward do not
grow with its texts."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.cpu_embed import texts
from benchmarks.embed_host import ops_outside_forward
from benchmarks.gpu_embed import build, hf_embedder
from tuili import LLM

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

TEXTS = texts(40) + ["one", "two words"]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request, tmp_path_factory):
    """(dtype, tuili's LLM, HF's embed function, HF's tokenizer) on one random BERT-base."""
    dtype = request.param
    folder = tmp_path_factory.mktemp(dtype)
    model, tok = build(folder, getattr(torch, dtype))
    llm = LLM(str(folder), dtype=dtype)
    yield dtype, llm, hf_embedder(model, tok), tok
    del llm, model
    torch.cuda.empty_cache()


def test_embed_equals_hf_batched_and_one_by_one(pair):
    dtype, llm, hf, tok = pair
    floor = 0.99999 if dtype == "float32" else 0.999
    longest = max(len(tok(t)["input_ids"]) for t in TEXTS)
    assert longest % 16  # the mask's rows are padded to 16 in memory, not in shape
    ours, theirs = llm.embed(TEXTS), hf(TEXTS)
    assert ours.shape == theirs.shape == (len(TEXTS), 768)
    assert F.cosine_similarity(ours, theirs).min() >= floor
    for text in TEXTS[:4] + TEXTS[-2:]:
        assert F.cosine_similarity(llm.embed(text), hf([text])).min() >= floor


def test_ops_outside_the_forward_do_not_grow_with_the_call(pair):
    _, llm, _, _ = pair
    counts = [ops_outside_forward(llm, TEXTS[:n])[0] for n in (2, 40)]
    assert counts[0] == counts[1] <= 32  # views included
