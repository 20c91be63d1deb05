"""Mixture-of-experts models against HF transformers: tiny random-weight Qwen3-MoE (a dense layer
among the sparse ones), Qwen2-MoE (a shared expert, routing weights not renormalised) and Mixtral
saved as HF folders, greedy tokens compared one by one and batched; the checkpoints' per-expert
tensor names; and `tuili analyze` on the published Qwen3-30B-A3B shape."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.gpu.random_models import byte_tokenizer
from tuili import LLM, SamplingParams
from tuili.analysis import ops
from tuili.analysis.moe import expected_experts
from tuili.analysis.shapes import SHAPES

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False, initializer_range=0.1)
VARIANTS = {
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=3,
        norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None)),
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 30)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (name, folder, HF model): each variant saved once, on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            config_cls, model_cls, extra = VARIANTS[name]
            torch.manual_seed(0)
            config = getattr(transformers, config_cls)(**COMMON, **extra)
            model = getattr(transformers, model_cls)(config).eval()
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            byte_tokenizer().save(str(folder / "tokenizer.json"))
            cache[name] = (name, folder, model)
        return cache[name]
    return get


@pytest.fixture(params=list(VARIANTS))
def variant(request, built):
    return built(request.param)


@torch.inference_mode()
def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_greedy_matches_hf(folder, model, name):
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64)
    assert llm.engine.model_config.architecture == model.config.architectures[0]
    ids = prompts()
    expected = [hf_greedy(model, p, GREEDY.max_tokens) for p in ids]
    assert [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ids] == expected, name
    assert [o.outputs[0].token_ids for o in llm.generate(ids, GREEDY)] == expected, name


def test_greedy_matches_hf(variant):
    assert_greedy_matches_hf(*variant[1:], variant[0])


def test_stacked_expert_checkpoint(built, tmp_path):
    """save_pretrained writes each expert apart (as the hub's checkpoints are: Mixtral's w1/w3/w2
    under block_sparse_moe); transformers 5 holds them stacked (experts.gate_up_proj,
    experts.down_proj). Rewritten stacked, the folder still gives HF's tokens."""
    name, folder, model = built("qwen3-moe")  # the names above the experts are all alike
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in tensors
    save_file(stack_experts(tensors, 8), tmp_path / "model.safetensors")
    assert_greedy_matches_hf(tmp_path, model, name)


def stack_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert projections -> experts.gate_up_proj [E, 2 * inter, hidden] and
    experts.down_proj [E, hidden, inter], as transformers 5 holds them."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    owners = {k.split(".experts.")[0] for k in tensors if ".experts." in k}
    for o in owners:
        get = lambda e, p: tensors[f"{o}.experts.{e}.{p}.weight"]  # noqa: E731
        out[f"{o}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(num_experts)])
        out[f"{o}.experts.down_proj"] = torch.stack([get(e, "down_proj")
                                                     for e in range(num_experts)])
    return out


def test_analyze_counts_active_expert_parameters(tmp_path):
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B of them active per token (its model card); a
    batch-1 decode step reads about the active ones, a batch-64 step nearly every expert."""
    c = SHAPES["qwen3-30b-a3b"]()
    p = ops.num_params(c)
    assert p["layers"] + p["tables"] == pytest.approx(30.5e9, rel=0.01)
    assert ops.active_params(c) == pytest.approx(3.3e9, rel=0.03)
    bf16 = ops.Precision.for_dtype("bf16")
    mlp_1 = next(o for o in ops.decode_ops(c, 1, 512, bf16) if o.name == "mlp")
    mlp_64 = next(o for o in ops.decode_ops(c, 64, 512, bf16) if o.name == "mlp")
    expert_bytes = 3 * 2048 * 768 * 2 * 48
    assert mlp_1.bytes_read == pytest.approx(8 * expert_bytes, rel=0.01)
    assert mlp_64.bytes_read / mlp_1.bytes_read == pytest.approx(expected_experts(64, 128, 8) / 8,
                                                                rel=0.01)
    assert expected_experts(64, 128, 8) > 125
    folder = tmp_path / "cfg.json"
    folder.write_text(json.dumps(SHAPES_QWEN3_30B_JSON))
    from tuili.analysis.report import analyze, format_report
    from tuili.analysis.measure import get_device
    from tuili.analysis.shapes import model_config

    config, _ = model_config(str(folder))
    assert config.moe.num_experts == 128 and config.moe.top_k == 8 and config.moe.renormalize
    report = format_report(analyze(config, get_device("h200"), bf16))
    assert "30.5B params (3.35B active: top-8 of 128 experts)" in report


# Qwen3-30B-A3B's published config.json, the fields tuili reads.
SHAPES_QWEN3_30B_JSON = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
