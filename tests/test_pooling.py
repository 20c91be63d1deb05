"""Pooling models on real weights: all-MiniLM-L6-v2 against sentence-transformers (also with
random-weight Dense modules added), SmolLM2 as an
embedder (last-token, mean) and as a yes/no reranker against HF transformers, and a cross-encoder
(BertForSequenceClassification) against HF transformers; the errors a pooling call can meet."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tuili import LLM, SamplingParams
from tuili.errors import InvalidParameter, ModelLoadError, WrongTask
from tuili.layers.encoder_attention import EncoderMetadata
from tuili.models.loader import resolve
from tuili.models.pooler import PooledRows
from tuili.models.pooling_config import load_pooling_config
from tuili.pooling_params import PoolingParams
from tuili.scoring import DECODER_PAIR

MINILM = "all-minilm-l6-v2"
# Mixed lengths: one word, sentences, non-ASCII, near ST's 256-token limit.
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "从前有一座山 😀🍕",
         "A query about the capital of France and its museums, " * 4,
         "Embeddings of long texts: " + "token " * 240]
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "Bananas are rich in potassium.",
        "The Eiffel Tower is in Paris.", "Berlin is the capital of Germany."]


@pytest.fixture(scope="session")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(resolve(MINILM)), device="cpu")


def cosines(a: torch.Tensor, b) -> torch.Tensor:
    return F.cosine_similarity(a.float(), torch.as_tensor(b).float(), dim=-1)


def test_minilm_equals_sentence_transformers_batched_and_one_by_one(minilm, st_model):
    assert minilm.engine.task == "embed"
    reference = torch.tensor(st_model.encode(TEXTS))
    batched = minilm.embed(TEXTS)
    assert batched.shape == reference.shape == (len(TEXTS), 384)
    assert cosines(batched, reference).min() >= 0.9999
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    for text, ref in zip(TEXTS, reference):
        assert cosines(minilm.embed(text)[0], ref) >= 0.9999


def test_minilm_dimensions_renormalize_and_normalize_off(minilm, st_model):
    full = minilm.embed(TEXTS[1], normalize=False)[0]
    raw = torch.tensor(st_model.encode([TEXTS[1]], normalize_embeddings=False)[0])
    # the Normalize module makes ST's output unit length whatever the flag: compare directions
    assert cosines(full, raw) >= 0.9999 and abs(float(full.norm()) - 1) > 1e-3
    short = minilm.embed(TEXTS[1], dimensions=32)[0]
    assert short.shape == (32,) and abs(float(short.norm()) - 1) < 1e-5
    assert torch.allclose(short, F.normalize(full[:32], dim=0), atol=1e-5)


def test_minilm_score_and_rerank_are_cosines_ranked(minilm):
    emb = minilm.embed([QUERY, *DOCS])
    expected = (emb[1:] @ emb[0]).tolist()
    assert minilm.score(QUERY, DOCS) == pytest.approx(expected, abs=1e-5)
    ranked = minilm.rerank(QUERY, DOCS, top_n=2)
    order = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]
    assert [i for i, _ in ranked] == order and ranked[0][0] == 0
    assert minilm.score([QUERY, DOCS[1]], [DOCS[0], DOCS[1]])[1] == pytest.approx(1.0, abs=1e-5)


def test_pooling_errors_name_the_problem(minilm):
    limit = minilm.engine.max_model_len
    assert limit == 256  # sentence_bert_config.json's max_seq_length
    with pytest.raises(InvalidParameter, match=f"more than the {limit}"):
        minilm.embed("word " * 300)
    with pytest.raises(InvalidParameter, match="empty"):
        minilm.embed([""])
    with pytest.raises(InvalidParameter, match="empty"):
        minilm.embed([])
    with pytest.raises(InvalidParameter, match="dimensions"):
        minilm.embed("a", dimensions=385)
    with pytest.raises(WrongTask, match="task=embed"):
        minilm.generate(["Hello"], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameter, match="text_2"):
        minilm.score([QUERY, QUERY], DOCS[:3])
    # a bad call queues nothing and leaves the engine serving
    assert not minilm.engine.has_unfinished_requests()
    assert not any(minilm.engine.pool.ref_counts)
    assert minilm.embed("still fine").shape == (1, 384)


def test_pooling_requests_share_steps_under_the_token_budget():
    """Pooling requests run whole, several to a step, within max_num_batched_tokens; blocks are
    all free after."""
    llm = LLM(MINILM, dtype="float32", max_num_batched_tokens=64)
    ids = [llm.tokenizer.encode(t) for t in TEXTS[:3]]
    assert sum(map(len, ids)) <= 64
    steps = []
    for i, p in enumerate(ids):
        llm.engine.add_request(f"r{i}", p, PoolingParams())
    while llm.engine.has_unfinished_requests():
        steps.append([o.request_id for o in llm.engine.step()])
    assert steps[0] == ["r0", "r1", "r2"]
    assert not any(llm.engine.pool.ref_counts)
    with pytest.raises(InvalidParameter, match="more than the 64"):
        llm.embed(TEXTS[4])  # fits max_model_len, not one step


def test_requests_of_different_kinds_in_one_step_get_what_each_alone_gets(minilm):
    """Truncation and normalization run once per kind of request in a step: a step mixing kinds
    (and pooling several texts at once) gives each request what a call of it alone gives."""
    kinds = [PoolingParams(), PoolingParams(dimensions=32), PoolingParams(normalize=False),
             PoolingParams(dimensions=64, normalize=False), PoolingParams()]
    alone = [minilm.encode([TEXTS[1]], p)[0].data for p in kinds]
    mixed = minilm.encode([TEXTS[1]] * len(kinds), kinds)
    for a, m in zip(alone, mixed):
        assert m.data.shape == a.shape and torch.allclose(m.data, a, atol=1e-5)


def test_gpu_layouts_equal_per_sequence_attention(minilm):
    """The GPU's layouts, run on the CPU: sequences padded to the longest (one SDPA call under the
    additive key mask), and one sequence attending views of its projection, give the CPU path's
    token states."""
    model = minilm.engine.runner.model
    seqs = [minilm.tokenizer.encode(t) for t in TEXTS]
    types = [[i % 2] * len(s) for i, s in enumerate(seqs)]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        flat, padded = (model(*EncoderMetadata.build(seqs, cpu, torch.float32, types, padded))
                        for padded in (False, True))
        ids, meta = EncoderMetadata.build(seqs[1:2], cpu, torch.float32)
        one = model(ids, meta)
        meta.contiguous = False
        one_viewed = model(ids, meta)
    assert flat.shape == (sum(map(len, seqs)), 384)
    assert torch.allclose(flat, padded, atol=1e-4)
    assert torch.allclose(one, one_viewed, atol=1e-5)


def test_pooled_rows_gather_sequences_anywhere_in_a_step(minilm):
    """Mean pooling of sequences that do not fill the step's rows (pooled beside other rows)
    equals each sequence's own mean."""
    cpu = torch.device("cpu")
    seqs = [(3, 2), (7, 3), (10, 1)]
    rows = PooledRows.build(seqs, 12, cpu)
    assert rows.rows.tolist() == [3, 4, 7, 8, 9, 10]
    assert rows.seq_index.tolist() == [0, 0, 1, 1, 1, 2]
    assert rows.first.tolist() == [3, 7, 10] and rows.lens.tolist() == [2, 3, 1]
    assert PooledRows.build([(0, 2), (2, 3)], 5, cpu).rows is None
    hidden = torch.randn(12, 384)
    expected = torch.stack([hidden[r:r + n].mean(0) for r, n in seqs])
    assert torch.allclose(minilm.engine.pooler.embed(hidden, rows), expected, atol=1e-6)


def test_an_embed_call_issues_as_many_ops_outside_the_forward_whatever_its_size(minilm):
    """Layout, pooling and normalization are batched: the ops an embed call issues outside the
    model's forward (kernel launches on the GPU) do not grow with its texts."""
    from benchmarks.embed_host import ops_outside_forward

    counts = [ops_outside_forward(minilm, TEXTS[:n])[0] for n in (2, 5)]
    assert counts[0] == counts[1] <= 16


# ---- sentence-transformers Dense modules (random weights on all-MiniLM-L6-v2) ---------------

OLD_NAMES = {"Transformer": "sentence_transformers.models.Transformer",
             "Pooling": "sentence_transformers.models.Pooling",
             "Dense": "sentence_transformers.models.Dense",
             "Normalize": "sentence_transformers.models.Normalize"}


@pytest.fixture(scope="module")
def dense_folders(tmp_path_factory, st_model):
    """MiniLM plus Dense(384 -> 256, GELU, bias) and Dense(256 -> 128, no bias, Identity), saved
    by sentence-transformers itself (its newer module names), and a copy spelled the old way
    (sentence_transformers.models.*, pooling_mode_* flags)."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.modules.dense import Dense

    torch.manual_seed(0)
    modules = list(st_model)
    dense = [Dense(384, 256, activation_function=torch.nn.GELU()),
             Dense(256, 128, bias=False, activation_function=torch.nn.Identity())]
    model = st.SentenceTransformer(modules=[*modules[:2], *dense, modules[2]], device="cpu")
    root = tmp_path_factory.mktemp("st-dense")
    new = root / "new"
    model.save(str(new))
    old = root / "old"
    shutil.copytree(new, old)
    entries = json.loads((old / "modules.json").read_text())
    for e in entries:
        e["type"] = OLD_NAMES[e["type"].rsplit(".", 1)[-1]]
    (old / "modules.json").write_text(json.dumps(entries))
    (old / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return new, old, model


def test_dense_modules_equal_sentence_transformers(dense_folders):
    new, old, model = dense_folders
    assert "base.modules.dense.Dense" in (new / "modules.json").read_text()
    reference = torch.tensor(model.encode(TEXTS))
    assert reference.shape == (len(TEXTS), 128)
    llm = LLM(str(new), dtype="float32")
    got = llm.embed(TEXTS)
    assert got.shape == reference.shape
    assert cosines(got, reference).min() >= 0.9999
    assert cosines(llm.embed(TEXTS[1])[0], reference[1]) >= 0.9999
    assert llm.embed(TEXTS[1], dimensions=64).shape == (1, 64)
    with pytest.raises(InvalidParameter, match="have 128"):
        llm.embed("a", dimensions=129)
    old_llm = LLM(str(old), dtype="float32")
    assert cosines(old_llm.embed(TEXTS), reference).min() >= 0.9999


def test_unsupported_sentence_transformers_modules_are_named(dense_folders, tmp_path):
    new, _, _ = dense_folders
    folder = tmp_path / "m"
    shutil.copytree(new, folder)
    entries = json.loads((folder / "modules.json").read_text())
    layer_norm = {"idx": 9, "name": "9", "path": "9_LayerNorm",
                  "type": "sentence_transformers.sentence_transformer.modules.layer_norm.LayerNorm"}
    (folder / "modules.json").write_text(json.dumps(entries + [layer_norm]))
    with pytest.raises(ModelLoadError, match="LayerNorm"):
        load_pooling_config("embed", "BertModel", folder, "auto", None, None)
    (folder / "modules.json").write_text(json.dumps([entries[0], entries[2], entries[1]]))
    with pytest.raises(ModelLoadError, match="order"):
        load_pooling_config("embed", "BertModel", folder, "auto", None, None)
    (folder / "modules.json").write_text(json.dumps(entries))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(ModelLoadError, match="max"):
        load_pooling_config("embed", "BertModel", folder, "auto", None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu"])
def test_onednn_linear_equals_f_linear(dtype, activation):
    from tuili.layers import onednn_linear
    from tuili.models.bert import _ACTIVATIONS

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160).to(dtype)
    packed = onednn_linear.pack(lin, activation)
    if packed is None:
        pytest.skip("no oneDNN path for this dtype on this CPU")
    for rows in (1, 37):
        x = torch.randn(rows, 96).to(dtype)
        want = F.linear(x, lin.weight, lin.bias)
        want = _ACTIVATIONS[activation](want) if activation else want
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(packed(x).float(), want.float(), atol=tol, rtol=tol)


# ---- decoders: SmolLM2's real weights against HF transformers --------------------------------

@pytest.fixture(scope="module")
def hf_decoder(hf_model):
    return hf_model


@torch.inference_mode()
def hf_last_hidden(model, ids: list[int]) -> torch.Tensor:
    return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_embeddings_equal_hf_hidden_states(pooling, hf_decoder):
    llm = LLM("smollm2-135m", dtype="float32", task="embed", pooling=pooling, num_kv_blocks=64)
    outs = llm.embed(TEXTS[:3])
    for text, got in zip(TEXTS[:3], outs):
        states = hf_last_hidden(hf_decoder, llm.tokenizer.encode(text))
        want = F.normalize(states[-1] if pooling == "last" else states.mean(0), dim=0)
        assert cosines(got, want) >= 0.9999
        assert torch.allclose(got, want, atol=2e-4)
    pool = llm.engine.pool  # the prefills kept no blocks, and offered none to the prefix cache
    assert not any(pool.ref_counts) and not pool.cached
    with pytest.raises(WrongTask, match="task=embed"):
        llm.generate(["Hi"], SamplingParams(max_tokens=1))


@torch.inference_mode()
def test_decoder_yes_no_reranker_equals_hf_logits(hf_decoder):
    llm = LLM("smollm2-135m", dtype="float32", task="score", score_tokens="no,yes",
              num_kv_blocks=64)
    no, yes = (llm.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("no", "yes"))
    scores = llm.score(QUERY, DOCS)
    for doc, got in zip(DOCS, scores):
        ids = llm.tokenizer.encode(DECODER_PAIR.format(query=QUERY, document=doc))
        logits = hf_decoder(input_ids=torch.tensor([ids])).logits[0, -1].float()
        want = torch.log_softmax(logits[[no, yes]], dim=0)[1].exp()
        assert got == pytest.approx(float(want), abs=1e-4)
    ranked = llm.rerank(QUERY, DOCS)
    assert [s for _, s in ranked] == sorted(scores, reverse=True)
    with pytest.raises(WrongTask, match="task=score"):
        llm.embed("a")


def test_generation_model_refuses_embeddings(llm):
    with pytest.raises(WrongTask, match="task=generate"):
        llm.embed("Hello")


# ---- a cross-encoder: BertForSequenceClassification (random weights) ------------------------

@pytest.fixture(scope="module")
def cross_encoder_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=1,
                                     max_position_embeddings=128)
    model = transformers.BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("cross") / "bert-cross"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(resolve(MINILM) / name, folder / name)
    return folder, model


@torch.inference_mode()
def test_cross_encoder_scores_equal_hf(cross_encoder_folder):
    transformers = pytest.importorskip("transformers")
    folder, hf = cross_encoder_folder
    llm = LLM(str(folder), dtype="float32")
    assert llm.engine.task == "score"
    scores = llm.score(QUERY, DOCS)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = tok([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
    assert enc["token_type_ids"].any()  # the pair's second segment is in play
    want = hf(**enc).logits[:, 0].sigmoid()
    assert scores == pytest.approx(want.tolist(), abs=1e-5)
    ranked = llm.rerank(QUERY, DOCS, top_n=3)
    assert [i for i, _ in ranked] == want.argsort(descending=True)[:3].tolist()
    with pytest.raises(WrongTask):
        llm.embed("a")
