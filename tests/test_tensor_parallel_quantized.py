"""Tensor parallelism with pre-quantized checkpoints (GPTQ with and without act-order, AWQ,
compressed-tensors FP8; tests/test_quantized_checkpoints.py writes them by the formats' packing
rules) and with the FP8 KV cache, on the CPU (gloo).

Each rank's shard, built in this process as rank r of N would build it, dequantizes to exactly
its rows or columns of the one-rank model's weights, read through lazy slices (a rank never reads
a packed tensor whole), and its products (float32; bfloat16 through torch's int4 CPU kernel) make
one rank's; over real ranks the greedy tokens equal one rank's, the log-probabilities within
float32 rounding; a row-parallel shard that would split a group is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.gpu.random_models import byte_tokenizer
from tests.test_quantized_checkpoints import FORMATS, fp8_layer, int4_layer
from tests.tiny_models import tiny_llama
from tuili import LLM, SamplingParams
from tuili.distributed.group import TensorParallel
from tuili.errors import InvalidParameter
from tuili.layers.linear import Linear
from tuili.layers.parallel import RowParallelLinear
from tuili.models import loader
from tuili.quantization import resolve

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# (query heads, KV heads, intermediate size); hidden 128, head_dim 32 (tests/tiny_models.py).
# Two ranks: o_proj and down hold 128 and 256 input features each, whole groups of 32..128.
# Three: 64 and 128 (group 128 does not fit o_proj's), one KV head replicated on each rank.
SHAPES = {2: (8, 2, 512), 3: (6, 1, 384)}
TEXTS = ["The capital of France is", "def fibonacci(n):\n    ",
         "Once upon a time, in a land far away, there lived a dragon who"]
TIMEOUT_S = 30.0


def gptq(group: int, act_order: bool = False, sym: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
            "sym": sym}


def awq(group: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
            "version": "gemm"}


QUANT = {
    "gptq-g64": gptq(64), "gptq-sym-g128": gptq(128, sym=True),
    "gptq-channel": gptq(-1), "gptq-actorder-g32": gptq(32, True),
    "gptq-actorder-g64": gptq(64, True), "gptq-actorder-g128": gptq(128, True),
    "gptq-actorder-g32-in-order": gptq(32, True),  # desc_act, its g_idx in input order
    "awq-g32": awq(32), "awq-g64": awq(64), "awq-g128": awq(128), "awq-channel": awq(-1),
    "fp8-channel": FORMATS["fp8-channel"][0], "fp8-tensor": FORMATS["fp8-tensor"][0],
    "fp8-block": {"quant_method": "fp8", "weight_block_size": [32, 32]},
}
# What each tensor-parallel size checks shard by shard: every format and group size over two
# ranks or three (over three, group 128 does not divide o_proj's 64-feature shards).
CASES = {2: ["gptq-sym-g128", "gptq-channel", "gptq-actorder-g32", "gptq-actorder-g128",
             "awq-g32", "fp8-channel", "fp8-tensor", "fp8-block"],
         3: ["gptq-g64", "gptq-actorder-g64", "gptq-actorder-g32-in-order", "awq-g64",
             "awq-channel", "fp8-block"]}


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """A float tiny Llama per tensor-parallel size (its tokenizer, norms, embedding, biases),
    over a byte-level vocabulary (259 ids: the ranks pad the LM head's rows)."""
    out = {}
    for tp, (heads, kv, inter) in SHAPES.items():
        folder = tmp_path_factory.mktemp(f"float{tp}") / "tiny-llama"
        tiny_llama(folder, None, heads=heads, kv=kv, inter=inter, tokenizer=byte_tokenizer())
        out[tp] = folder
    return out


def write_quantized(folder, base, q_config: dict, seed: int = 0, in_order: bool = False):
    """`base` (a tiny_llama folder) with every projection's weight replaced by random weights in
    the format of q_config, the biases kept. in_order: act-order's g_idx in input order."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            (folder / name).symlink_to(base / name)
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": q_config}))
    tensors = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for i in range(config["num_hidden_layers"]):
        perms = {}  # q/k/v read one input, gate/up another: one act-order each
        for proj in PROJ:
            name = f"model.layers.{i}.{proj}"
            n, k = tensors.pop(f"{name}.weight").shape
            if q_config["quant_method"] == "fp8":  # transformers' fine-grained: per block
                packed = fp8_block_layer(name, rng, n, k, q_config["weight_block_size"])
            elif q_config["quant_method"] == "compressed-tensors":
                strategy = q_config["config_groups"]["group_0"]["weights"]["strategy"]
                packed, _ = fp8_layer(name, rng, n, k, strategy)
            else:
                reads = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
                key = reads.get(proj.split(".")[1], proj.split(".")[1])
                perm = perms.setdefault(key, np.arange(k) if in_order else rng.permutation(k))
                packed, _ = int4_layer(name, rng, n, k, q_config, perm)
            tensors.update(packed)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def fp8_block_layer(name: str, rng: np.random.Generator, n: int, k: int, block) -> dict:
    """FP8 weights with a float32 `weight_scale_inv` per [rows, columns] block."""
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) * 40
    scales = rng.random((-(-n // block[0]), -(-k // block[1]))).astype(np.float32) * 1e-3 + 5e-4
    return {f"{name}.weight": w.clamp(-448, 448).to(torch.float8_e4m3fn),
            f"{name}.weight_scale_inv": torch.from_numpy(scales)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, floats):
    """(tensor-parallel size, format) -> a checkpoint folder, written when first asked for."""
    made = {}
    root = tmp_path_factory.mktemp("quantized")

    def get(tp: int, fmt: str):
        if (tp, fmt) not in made:
            made[tp, fmt] = write_quantized(root / f"{fmt}-tp{tp}", floats[tp], QUANT[fmt],
                                            in_order=fmt.endswith("in-order"))
        return made[tp, fmt]

    return get


class Recorder:
    """A lazy checkpoint tensor that notes how it is read: whole, or which narrow."""

    def __init__(self, name: str, lazy, log: list):
        self.name, self.lazy, self.log, self.shape = name, lazy, log, lazy.shape

    def narrow(self, dim: int, start: int, n: int):
        self.log.append((self.name, "narrow"))
        return self.lazy.narrow(dim, start, n)

    def materialize(self):
        self.log.append((self.name, "whole"))
        return self.lazy.materialize()


def build_rank(folder, rank: int, size: int, log: list | None = None,
               dtype: torch.dtype = torch.float32):
    """The model rank `rank` of `size` builds (in this process: loading runs no collective)."""
    config, weights, _, _, raw = loader._open_folder(folder, lazy=size > 1)
    if log is not None:
        weights = ((name, Recorder(name, t, log)) for name, t in weights)
    qc = resolve("auto", raw.get("quantization_config"), str(folder), False)
    model, _ = loader.build(config, weights, qc, dtype, torch.device("cpu"),
                            TensorParallel(rank, size), str(folder))
    return model


def quantized_layers(model) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and m.method.name not in ("none", "gguf")}


@pytest.mark.parametrize("size,fmt", [(tp, f) for tp in CASES for f in CASES[tp]])
@torch.inference_mode()
def test_each_rank_holds_exactly_its_shard(size, fmt, checkpoints):
    """Every rank's quantized layers dequantize to exactly their rows (QKV, gate/up: each
    part's, the KV head replicated where 3 ranks share one) or columns (o_proj, down: for
    act-order, the shard's channels of g_idx over all the groups' scales) of one rank's, and
    each rank reads the packed tensors through slices only."""
    folder = checkpoints(size, fmt)
    one = quantized_layers(build_rank(folder, 0, 1))
    assert len(one) == 2 * 4  # qkv, o, gate_up, down of each layer
    g = torch.Generator().manual_seed(0)
    x = {name: torch.randn(3, layer.in_features, generator=g) for name, layer in one.items()}
    y = {name: layer.method.apply(layer, x[name]) for name, layer in one.items()}
    sums = {}  # row-parallel layers: the ranks' partial products, summed
    for rank in range(size):
        log = []
        layers = quantized_layers(build_rank(folder, rank, size, log))
        assert layers.keys() == one.keys()
        for name, layer in layers.items():
            w = one[name].method.dequantize(one[name])
            if isinstance(layer, RowParallelLinear):
                cols = slice(layer.in_start, layer.in_start + layer.in_features)
                want = w[:, cols]
                sums[name] = sums.get(name, 0) + layer.method.apply(layer, x[name][:, cols])
            else:  # each part's rows: (first, rows) within the part (parallel.qkv_shards)
                firsts = np.cumsum([0] + one[name].out_sizes[:-1])
                rows = torch.cat([torch.arange(f + s, f + s + n)
                                  for f, (s, n) in zip(firsts, layer.shards)])
                want = w[rows]
                torch.testing.assert_close(layer.method.apply(layer, x[name]), y[name][:, rows])
            if fmt.endswith("in-order"):  # a row shard keeps only its groups: no gather
                assert layer.perm is None and layer.scales.shape[0] == layer.in_features // 32
            got = layer.method.dequantize(layer)
            assert got.shape == want.shape, (name, rank)
            assert torch.equal(got, want), (name, rank)
        # The packed weights are read in slices, but where a replicated KV head is all of k/v.
        replicated = ("k_proj", "v_proj") if SHAPES[size][1] < size else ()
        packed = {n for n, _ in log if n.endswith((".qweight", "proj.weight"))
                  and not any(p in n for p in replicated)}
        assert len(packed) == 2 * (7 - len(replicated))
        assert all(how == "narrow" for n, how in log if n in packed), log
    for name, total in sums.items():
        torch.testing.assert_close(total, y[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq-sym-g128", "awq-g64"])
@torch.inference_mode()
def test_bfloat16_shards_run_the_int4_cpu_kernel(fmt, checkpoints):
    """In bfloat16 each rank's shard runs torch's int4 CPU kernel (its groups whole), and the
    ranks' outputs make one rank's: its columns, or (row-parallel) summed, within bf16 rounding."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no int4 CPU kernel")
    folder = checkpoints(2, fmt)
    one = quantized_layers(build_rank(folder, 0, 1, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(3, m.in_features, generator=g).bfloat16() for n, m in one.items()}
    y = {n: m.method.apply(m, x[n]).float() for n, m in one.items()}
    sums = {}
    for rank in range(2):
        shard = quantized_layers(build_rank(folder, rank, 2, dtype=torch.bfloat16))
        for name, layer in shard.items():
            assert layer.cpu_int4 is not None, name
            if isinstance(layer, RowParallelLinear):
                cols = slice(layer.in_start, layer.in_start + layer.in_features)
                part = x[name][:, cols].contiguous()
                sums[name] = sums.get(name, 0) + layer.method.apply(layer, part).float()
            else:
                out = layer.method.apply(layer, x[name]).float()
                firsts = np.cumsum([0] + one[name].out_sizes[:-1])
                rows = torch.cat([torch.arange(f + s, f + s + n)
                                  for f, (s, n) in zip(firsts, layer.shards)])
                torch.testing.assert_close(out, y[name][:, rows], rtol=1.6e-2, atol=1e-2)
    for name, total in sums.items():  # two bf16 partial sums, rounded, then added
        scale = y[name].abs().max()
        assert (total - y[name]).abs().max() <= 2 ** -7 * scale, name


def test_a_shard_that_splits_a_group_is_refused(checkpoints):
    """Group 128 over four ranks' o_proj (64 of its 256 input features each): refused, naming
    the layer, the sizes and the option. (Act-order needs no whole groups: its shards read
    every group's scales; per-channel has one group, which every rank reads.)"""
    folder = checkpoints(2, "gptq-sym-g128")
    with pytest.raises(InvalidParameter, match=r"tensor_parallel_size: layers\.0\.self_attn\."
                       r"o_proj: gptq group size 128 does not divide this rank's 64 of the "
                       r"layer's 256 input features \(tensor_parallel_size=4\)"):
        build_rank(folder, 1, 4)
    build_rank(checkpoints(2, "gptq-actorder-g128"), 1, 4)
    build_rank(checkpoints(2, "awq-channel"), 1, 4)


# ---- over real ranks (one process each, gloo): one engine at a time -------------------------

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
ENGINE = dict(dtype="float32", num_kv_blocks=32, block_size=8)


def run(folder, size: int = 1, **options) -> list:
    llm = LLM(str(folder), tensor_parallel_size=size, distributed_timeout_s=TIMEOUT_S,
              **ENGINE, **options)
    try:
        ids = [llm.tokenizer.encode(t) for t in TEXTS]
        return llm, llm.generate(ids, GREEDY)
    finally:
        if size > 1:
            llm.engine.shutdown()


def assert_same(want, got, atol: float) -> None:
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert [lp.logprob for lp in g.outputs[0].logprobs] == pytest.approx(
            [lp.logprob for lp in w.outputs[0].logprobs], abs=atol)


@pytest.mark.parametrize("size,fmt,kv", [(2, "gptq-actorder-g32", "auto"),
                                         (3, "awq-g64", "fp8"), (2, "fp8-channel", "fp8")])
def test_ranks_generate_what_one_rank_does(size, fmt, kv, checkpoints):
    """Greedy tokens equal one rank's, log-probabilities within float32 rounding: GPTQ with
    act-order (its row shards padded), AWQ over 3 ranks with the FP8 KV cache calibrated (the
    one KV head replicated: every rank agrees on its scales), compressed-tensors FP8 with the
    checkpoint's per-KV-head scales (each rank takes its head's)."""
    folder = checkpoints(size, fmt)
    if fmt.startswith("fp8"):
        scales = {}
        for i in range(2):
            p = f"model.layers.{i}.self_attn."
            scales |= {p + "k_scale": torch.tensor([0.02, 0.03]) * (i + 1),
                       p + "v_scale": torch.tensor([0.01, 0.015]) * (i + 1)}
        save_file(scales, str(folder / "kv_scales.safetensors"))
    _, want = run(folder, kv_cache_dtype=kv)
    llm, got = run(folder, size, kv_cache_dtype=kv)
    attn = llm.engine.runner.model.attention_layers()[1]
    if fmt.startswith("fp8"):  # rank 0 holds KV head 0 of 2
        assert attn.k_scale.tolist() == pytest.approx([0.04])
    # Float32 sums in another order: 1e-4; with the FP8 cache, a key that this tips across an
    # e4m3 step moves a log-probability by ~1e-3 (tests/test_fp8_kv.py): 0.01.
    assert_same(want, got, 1e-4 if kv == "auto" else 0.01)
