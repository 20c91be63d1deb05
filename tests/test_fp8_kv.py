"""The FP8 KV cache on CPU (the torch reference path). On a tiny random-weight Llama HF folder:
prompt log-likelihoods beside the float32 cache, twice (bf16) / four times (float32) the tokens in
the same memory, scales read from a checkpoint or calibrated, a bad kv_cache_dtype refused. On
the real SmolLM2 (a random model's top logits are too close to tell quantization noise from a
tie): greedy tokens beside the float32 cache's."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import MODEL
from tests.tiny_models import tiny_llama
from tuili import LLM, SamplingParams
from tuili.config import EngineConfig
from tuili.engine.memory import plan_kv_cache
from tuili.errors import InvalidParameter

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land",
           "1, 2, 3, 4, 5,", "Water boils at a temperature of", "The best way to learn is"]
TOKENS = 16
SMOL_TOKENS = 24
# The tiny model's prompt log-probabilities moved by a mean 0.079, at most 0.33: bounds 2.5x.
MEAN_BOUND, MAX_BOUND = 0.2, 0.8
OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.01, num_threads=1,
               max_num_seqs=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gguf_path):
    path = tmp_path_factory.mktemp("fp8kv") / "tiny-llama"
    tiny_llama(path, gguf_path, heads=4, kv=2)
    return path


@pytest.fixture(scope="module")
def runs(folder, caplog_module):
    """(llm, its outputs) for the float32 cache and the FP8 one (calibrated)."""
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True, prompt_logprobs=0)
    out = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model=str(folder), kv_cache_dtype=kv, **OPTIONS)
        out[kv] = (llm, llm.generate(PROMPTS, params))
    return out


@pytest.fixture(scope="module")
def caplog_module():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tuili")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_prompt_logprobs_close_to_the_float_cache(runs):
    """Prefill attention reads every key back from the FP8 cache: the prompt tokens'
    log-probabilities move by the format's error (3 mantissa bits; a random model amplifies it)
    and no more."""
    diffs = []
    for a, b in zip(runs["auto"][1], runs["fp8"][1]):
        x = torch.tensor([lp.logprob for lp in a.prompt_logprobs[1:]])
        y = torch.tensor([lp.logprob for lp in b.prompt_logprobs[1:]])
        diffs.append((x - y).abs())
    diffs = torch.cat(diffs)
    print(f"prompt logprob |diff|: mean {diffs.mean():.4f}, max {diffs.max():.4f}")
    assert diffs.max() > 0  # the cache really is quantized
    assert diffs.mean() < MEAN_BOUND and diffs.max() < MAX_BOUND


def test_capacity_and_log_lines(runs, caplog_module):
    ref, fp8 = runs["auto"][0].engine, runs["fp8"][0].engine
    assert fp8.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    # One byte an element, not four (the budget's remainder may hold one block more).
    assert 0 <= fp8.pool.num_blocks - 4 * ref.pool.num_blocks < 4
    lines = [r.getMessage() for r in caplog_module]
    assert any("float8_e4m3fn" in m and "KV cache:" in m for m in lines)
    assert any("FP8 KV cache" in m and "calibrated" in m for m in lines)
    layer = fp8.model_config  # calibrated scales: one per layer and KV head, positive
    attn = runs["fp8"][0].engine.runner.model.attention_layers()
    assert len(attn) == layer.num_layers
    assert all(a.k_scale.shape == (2,) and torch.all(a.k_scale > 0) for a in attn)


def test_bf16_model_gets_twice_the_tokens(runs):
    engine = runs["auto"][0].engine
    model = engine.runner.model
    config = EngineConfig(kv_cache_memory_gb=0.01, max_num_batched_tokens=64)
    cpu = torch.device("cpu")
    bf16, _ = plan_kv_cache(config, engine.model_config, model, torch.bfloat16, cpu, 0)
    fp8, _ = plan_kv_cache(config, engine.model_config, model, torch.bfloat16, cpu, 0,
                           kv_dtype=torch.float8_e4m3fn)
    assert 0 <= fp8 - 2 * bf16 < 2


def test_checkpoint_scales_are_read(folder, tmp_path, caplog_module):
    """A checkpoint with k_scale / v_scale per attention layer (vLLM's layout, one scalar each,
    and per KV head): the engine binds them instead of calibrating."""
    ckpt = tmp_path / "with-scales"
    ckpt.mkdir()
    for f in folder.iterdir():
        (ckpt / f.name).symlink_to(f)
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.05),
              "model.layers.0.self_attn.v_scale": torch.tensor(0.01),
              "model.layers.1.self_attn.k_scale": torch.tensor([0.04, 0.06]),
              "model.layers.1.self_attn.v_scale": torch.tensor([0.02, 0.03])}
    save_file(scales, str(ckpt / "kv_scales.safetensors"))
    caplog_module.clear()
    llm = LLM(model=str(ckpt), kv_cache_dtype="fp8_e4m3", **OPTIONS)
    attn = llm.engine.runner.model.attention_layers()
    assert attn[0].k_scale.tolist() == pytest.approx([0.05, 0.05])
    assert attn[0].v_scale.tolist() == pytest.approx([0.01, 0.01])
    assert attn[1].k_scale.tolist() == pytest.approx([0.04, 0.06])
    assert attn[1].v_scale.tolist() == pytest.approx([0.02, 0.03])
    assert any("from the checkpoint" in r.getMessage() for r in caplog_module)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    # The same checkpoint with the default cache ignores the scales.
    plain = LLM(model=str(ckpt), **OPTIONS)
    assert plain.engine.runner.model.attention_layers()[0].k_scale is None


def test_bad_kv_cache_dtype_is_refused():
    with pytest.raises(InvalidParameter) as e:
        EngineConfig(kv_cache_dtype="int8").validate()
    assert "kv_cache_dtype" in str(e.value) and "auto, fp8, fp8_e4m3" in str(e.value)


def test_two_ranks_give_one_ranks_tokens(folder, runs):
    """Tensor parallelism over 2 ranks, one of the 2 KV heads each: every rank calibrates its
    heads' scales in the same prefill (its collectives run on all), and the FP8 cache gives the
    tokens and prompt log-probabilities of one rank's FP8 cache."""
    llm = LLM(model=str(folder), kv_cache_dtype="fp8", tensor_parallel_size=2,
              distributed_timeout_s=30.0, **OPTIONS)
    try:
        attn = llm.engine.runner.model.attention_layers()
        assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        one = runs["fp8"][0].engine.runner.model.attention_layers()
        for a, b in zip(attn, one):  # rank 0 holds KV head 0: the scale one rank calibrates
            assert a.k_scale.shape == (1,)
            torch.testing.assert_close(a.k_scale, b.k_scale[:1], rtol=1e-4, atol=0)
            torch.testing.assert_close(a.v_scale, b.v_scale[:1], rtol=1e-4, atol=0)
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True,
                                prompt_logprobs=0)
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.shutdown()
    # The ranks' sums round differently in float32; where that tips a key across an e4m3 step
    # a log-probability moves by ~1e-3 (measured: at most 0.0015, against the FP8 cache's own
    # 0.08 mean from the float cache): bound 0.01.
    for w, g in zip(runs["fp8"][1], got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [lp.logprob for lp in g.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in w.prompt_logprobs[1:]], abs=0.01)


@pytest.fixture(scope="module")
def smol_runs(llm):
    """SmolLM2's greedy continuations with the float32 cache (the session's engine), and the
    FP8 engine's log-probabilities of them, teacher-forced in one prefill."""
    greedy = SamplingParams(max_tokens=SMOL_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    ref = llm.generate(PROMPTS, greedy)
    fp8 = LLM(MODEL, dtype="float32", kv_cache_dtype="fp8", max_num_seqs=8)
    forced = fp8.generate([o.prompt_token_ids + o.outputs[0].token_ids for o in ref],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    first = fp8.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, logprobs=1))
    return ref, forced, first


def test_smollm2_greedy_tokens_agree_with_the_float_cache(smol_runs):
    ref, forced, first = smol_runs
    agree = total = 0
    for r, f in zip(ref, forced):
        ranks = [lp.rank for lp in f.prompt_logprobs[len(r.prompt_token_ids):]]
        agree, total = agree + ranks.count(1), total + len(ranks)
    # Each of the float cache's greedy tokens is the FP8 engine's argmax too, given the same
    # text before it. Measured: 140 of 144 (6 prompts x 24 tokens); the 4 others rank second.
    assert agree / total >= 0.9, f"{agree}/{total}"
    # The first decode step (prefill of the prompt alone): same token, close log-probability.
    same = sum(r.outputs[0].token_ids[0] == f.outputs[0].token_ids[0] for r, f in zip(ref, first))
    assert same >= len(PROMPTS) - 1
    for r, f in zip(ref, first):
        if r.outputs[0].token_ids[0] == f.outputs[0].token_ids[0]:
            assert abs(r.outputs[0].logprobs[0].logprob - f.outputs[0].logprobs[0].logprob) < 0.3


def test_prefix_cache_and_chunked_prefill_repeat_exactly(folder):
    """Prompts prefilled in chunks of 8 tokens, then again through the prefix cache (their
    blocks read back as stored): the same FP8 cache, the same tokens."""
    llm = LLM(model=str(folder), kv_cache_dtype="fp8", max_num_batched_tokens=8,
              **{**OPTIONS, "max_num_seqs": 2})
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    long = [p * 10 for p in PROMPTS[:3]]  # 50+ tokens: full blocks to share
    first = llm.generate(long, params)
    again = llm.generate(long, params)
    assert all(o.num_cached_tokens > 0 for o in again)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]


def test_kv_cache_dtype_flag():
    import argparse

    from tuili.options import add_engine_options, engine_options

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    assert engine_options(parser.parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    assert engine_options(parser.parse_args([]))["kv_cache_dtype"] == "auto"
