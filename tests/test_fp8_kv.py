"""The FP8 KV cache on CPU (the torch reference path), on a tiny random-weight Llama HF folder:
greedy tokens and prompt log-likelihoods beside the float32 cache, twice (bf16) / four times
(float32) the tokens in the same memory, scales read from a checkpoint or calibrated, and a bad
kv_cache_dtype refused."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import tiny_llama
from tuili import LLM, SamplingParams
from tuili.config import EngineConfig
from tuili.engine.memory import plan_kv_cache
from tuili.errors import InvalidParameter

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land",
           "1, 2, 3, 4, 5,", "Water boils at a temperature of", "The best way to learn is"]
TOKENS = 16
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


def test_greedy_tokens_agree_with_the_float_cache(runs):
    ref, fp8 = runs["auto"][1], runs["fp8"][1]
    same = total = 0
    for a, b in zip(ref, fp8):
        x, y = a.outputs[0].token_ids, b.outputs[0].token_ids
        # Tokens after the first disagreement continue a different text: count up to it.
        agree = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        same, total = same + agree, total + len(x)
    # Measured: 96/96 (6 prompts x 16 tokens) on this model.
    assert same / total >= 0.9, f"{same}/{total} greedy tokens before the first disagreement"


def test_prompt_logprobs_close_to_the_float_cache(runs):
    """Prefill attention reads every key back from the FP8 cache: the prompt tokens'
    log-probabilities stay within the format's error of the float32 cache's."""
    worst = 0.0
    for a, b in zip(runs["auto"][1], runs["fp8"][1]):
        x = torch.tensor([lp.logprob for lp in a.prompt_logprobs[1:]])
        y = torch.tensor([lp.logprob for lp in b.prompt_logprobs[1:]])
        worst = max(worst, (x - y).abs().max().item())
        assert (x - y).abs().mean() < 0.02
    assert worst > 0  # the cache really is quantized
    assert worst < 0.2


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
    with pytest.raises(InvalidParameter, match="tensor parallelism"):
        EngineConfig(kv_cache_dtype="fp8", tensor_parallel_size=2).validate()
