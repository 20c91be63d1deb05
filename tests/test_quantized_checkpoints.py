"""Pre-quantized checkpoints (GPTQ with and without act-order, AWQ, compressed-tensors FP8), written
here by the formats' published packing rules from random integer weights, loaded by tuili: the
log-likelihoods of a text and the greedy tokens equal HF transformers' on the dequantized weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tuili import LLM, SamplingParams
from tuili.errors import ModelLoadError

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble j of a word holds column AWQ_ORDER[j]
# name -> (quantization_config, format options)
FORMATS = {
    "gptq-sym-g128": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                       "sym": True}, {}),
    "gptq-actorder-g32": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                           "sym": False}, {}),
    "gptq-channel": ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False,
                      "sym": False}, {}),
    "awq-g64": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                 "version": "gemm"}, {}),
    "fp8-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                     "config_groups": {"group_0": {
                         "targets": ["Linear"],
                         "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                     "symmetric": True, "dynamic": False},
                         "input_activations": {"num_bits": 8, "type": "float",
                                               "strategy": "token", "dynamic": True}}},
                     "ignore": ["lm_head"]}, {}),
    "fp8-tensor": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}},
                    "ignore": ["lm_head"]}, {}),
}


def pack_along_rows(q: np.ndarray) -> np.ndarray:
    """GPTQ's qweight: word [i, j] holds q[8i + b, j] in bits 4b..4b+3."""
    q = q.astype(np.uint32)
    out = np.zeros((q.shape[0] // 8, q.shape[1]), np.uint32)
    for b in range(8):
        out |= q[b::8, :] << np.uint32(4 * b)
    return out.view(np.int32)


def pack_along_cols(q: np.ndarray, order=range(8)) -> np.ndarray:
    """Word [i, c] holds q[i, 8c + order[j]] in bits 4j..4j+3 (GPTQ's qzeros: order 0..7)."""
    q = q.astype(np.uint32)
    out = np.zeros((q.shape[0], q.shape[1] // 8), np.uint32)
    for j, col in enumerate(order):
        out |= q[:, col::8] << np.uint32(4 * j)
    return out.view(np.int32)


def int4_layer(name: str, rng: np.random.Generator, n: int, k: int, q_config: dict, perm=None):
    """Random 4-bit weights of one layer in the format's tensors, and their dequantized [n, k].
    perm: act-order's order of the input channels (layers reading one input share it)."""
    group = k if q_config["group_size"] == -1 else q_config["group_size"]
    groups = k // group
    q = rng.integers(0, 16, (k, n))
    sym = q_config.get("sym", False)
    zeros = np.full((groups, n), 8) if sym else rng.integers(1, 16, (groups, n))
    scales = (rng.random((groups, n)) * 0.02 + 0.005).astype(np.float16)
    g_idx = np.arange(k) // group
    if q_config.get("desc_act"):
        # act-order: input channel perm[i] falls in group i // group
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // group
    w = (q - zeros[g_idx]) * scales[g_idx].astype(np.float32)  # [k, n]
    t = torch.from_numpy
    if q_config["quant_method"] == "gptq":
        tensors = {"qweight": pack_along_rows(q),
                   "qzeros": pack_along_cols(zeros - 1),  # AutoGPTQ (v1) stores zero - 1
                   "scales": scales, "g_idx": g_idx.astype(np.int32)}
    else:
        tensors = {"qweight": pack_along_cols(q, AWQ_ORDER),
                   "qzeros": pack_along_cols(zeros, AWQ_ORDER), "scales": scales}
    return {f"{name}.{key}": t(np.ascontiguousarray(v)) for key, v in tensors.items()}, t(w.T.copy())


def fp8_layer(name: str, rng: np.random.Generator, n: int, k: int, strategy: str):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) * 40
    q = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.from_numpy(rng.random((n, 1)).astype(np.float32) * 1e-3 + 5e-4)
    if strategy == "tensor":
        scale = scale[:1, 0]
    return {f"{name}.weight": q, f"{name}.weight_scale": scale}, q.float() * scale.reshape(-1, 1)


@pytest.fixture(scope="module")
def base(smollm2_folder):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG, initializer_range=0.05,
                                      architectures=["LlamaForCausalLM"])
    return config, transformers.LlamaForCausalLM(config).eval(), smollm2_folder


def write_checkpoint(folder, base, q_config: dict, seed: int = 0):
    """The base model with every projection replaced by random quantized weights: the folder,
    and the HF model carrying the same weights dequantized."""
    config, model, tokenizer_folder = base
    rng = np.random.default_rng(seed)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not any(f"{p}.weight" in k for p in PROJ) and k != "lm_head.weight"}
    dequantized = {}
    for i in range(config.num_hidden_layers):
        inputs = {}  # q/k/v read one input, gate/up another: one act-order each
        for proj in PROJ:
            lin = model.get_submodule(f"model.layers.{i}.{proj}")
            name = f"model.layers.{i}.{proj}"
            if q_config["quant_method"] == "compressed-tensors":
                strategy = q_config["config_groups"]["group_0"]["weights"]["strategy"]
                packed, w = fp8_layer(name, rng, lin.out_features, lin.in_features, strategy)
            else:
                shared = proj.replace("k_proj", "q_proj").replace("v_proj", "q_proj")
                perm = inputs.setdefault(shared.replace("up_proj", "gate_proj"),
                                         rng.permutation(lin.in_features))
                packed, w = int4_layer(name, rng, lin.out_features, lin.in_features, q_config,
                                       perm)
            tensors.update(packed)
            dequantized[f"{name}.weight"] = w
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    config.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "quantization_config": q_config}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict({**model.state_dict(), **dequantized})
    return folder, reference


@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.inference_mode()
def test_checkpoint_logits_equal_dequantized(fmt, base, tmp_path):
    q_config, _ = FORMATS[fmt]
    folder, reference = write_checkpoint(tmp_path / fmt, base, q_config)
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=16, profile=True)
    layer = llm.engine.runner.model.layers[1].mlp.down_proj
    assert layer.method.name == ("fp8" if fmt.startswith("fp8") else fmt.split("-")[0])
    # The profiler's MBU counts the bytes the layers hold: 8 or 4.25 bits per weight.
    assert llm.engine.profiler.precision.weights == ("fp8" if fmt.startswith("fp8") else "int4")
    assert llm.engine.runner.model.lm_head.method.name == "none"
    ids = llm.tokenizer.encode(TEXT)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                             prompt_logprobs=3))[0]
    logits = reference(input_ids=torch.tensor([ids + out.outputs[0].token_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    ours = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]], dtype=torch.float64)
    theirs = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    assert out.outputs[0].token_ids == logits[len(ids) - 1:-1].argmax(-1).tolist()


def test_unsupported_quantization_configs_are_named(base, tmp_path):
    cases = {
        "bitsandbytes": ({"quant_method": "bitsandbytes"}, "method 'bitsandbytes' is not supported; supported: gptq, awq"),
        "gptq3": ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq with 3 bits is not supported; supported: 4"),
        "gptq-g16": ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "gptq group size 16 is not supported; supported: -1, 32, 64, 128"),
        "awq-gemv": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv' is not supported; supported: gemm"),
        "ct-int4": ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    }
    config, _, tokenizer_folder = base
    for name, (q_config, message) in cases.items():
        folder = tmp_path / name
        config.save_pretrained(folder)
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, "quantization_config": q_config}))
        shutil.copy(tokenizer_folder / "tokenizer.json", folder / "tokenizer.json")
        with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
            LLM(str(folder), dtype="float32")


def test_requested_method_must_fit_the_checkpoint(base, tmp_path):
    folder, _ = write_checkpoint(tmp_path / "gptq", base, FORMATS["gptq-sym-g128"][0])
    with pytest.raises(ValueError, match="is a gptq checkpoint; use auto or gptq"):
        LLM(str(folder), dtype="float32", quantization="awq")
    config, model, tokenizer_folder = base
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, plain / name)
    with pytest.raises(ValueError, match="has no quantization_config; to quantize float "
                                         "weights at load use one of fp8, int8, int4"):
        LLM(str(plain), dtype="float32", quantization="gptq")
    # At load, with --quantize-lm-head: the tied head is quantized, the embedding stays float.
    llm = LLM(str(plain), dtype="float32", num_kv_blocks=16, quantization="int8",
              quantize_lm_head=True)
    ours = llm.engine.runner.model
    assert ours.lm_head.method.name == "int8" and ours.lm_head.weight.dtype == torch.int8
    torch.testing.assert_close(ours.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = llm.tokenizer.encode(TEXT)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    theirs = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours_lp = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]], dtype=torch.float64)
    assert (ours_lp - theirs).abs().max() < 0.05  # int8 per channel: close to the float model
