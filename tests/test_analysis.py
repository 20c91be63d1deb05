"""The roofline analyst: the classic worked figures, plots, the CLI, and the profiler on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuili.analysis import memory, ops, roofline
from tuili.analysis.measure import get_device
from tuili.analysis.report import analyze, write_output
from tuili.analysis.shapes import SHAPES, model_config
from tuili.errors import InvalidParameter, ModelLoadError
from tuili.layers.linear import Linear

FP16 = ops.Precision.for_dtype("fp16")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tuili", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---- worked figures -----------------------------------------------------------------------

def test_gemv_intensity_is_one_and_rises_with_batch():
    # [B, 4096] @ [4096, 11008] in fp16: at B=1 every weight byte feeds one multiply-add.
    intensities = [ops.matmul("mlp", b, 4096, 11008, 2, 2).intensity for b in (1, 16, 64, 256, 512)]
    assert intensities[0] == pytest.approx(1.0, abs=0.01)
    assert all(a < b for a, b in zip(intensities, intensities[1:]))
    assert intensities[1] == pytest.approx(16, rel=0.02)  # weights still dominate the bytes
    assert 200 < intensities[3] < 256 and 400 < intensities[4] < 512  # activations start to count


def test_device_ridges():
    assert get_device("h100").ridge("bf16") == pytest.approx(989e12 / 3.35e12, rel=0.01)
    assert round(get_device("h100").ridge()) == 295
    assert get_device("h200").ridge() == pytest.approx(989.4 / 4.8, rel=0.01)
    assert get_device("a100").ridge() == pytest.approx(312 / 2.039, rel=0.01)
    assert get_device("h100").ridge("fp8") == pytest.approx(2 * get_device("h100").ridge(), rel=1e-3)
    assert get_device("a100").peak_flops("fp8") == get_device("a100").peak_flops("bf16")  # no fp8 units
    with pytest.raises(InvalidParameter, match="device: got 'tpu'"):
        get_device("tpu")


def test_four_token_fp32_lookup_reads_64_kib():
    assert ops.embedding_gather(4, 4096, 4, 4).bytes_read == 64 * 1024
    c = SHAPES["llama-2-7b"]()  # hidden 4096
    step = ops.step_ops(c, [(4, 4)], 1, ops.Precision.for_dtype("fp32"))
    assert step[0].name == "embedding" and step[0].bytes_read == 64 * 1024 and step[0].flops == 0


def test_llama2_13b_kv_cache_is_800_kib_per_token():
    c = SHAPES["llama-2-13b"]()
    per_token = memory.kv_bytes_per_token(c, "fp16")
    assert per_token == 800 * 1024  # 2 (K, V) x 40 layers x 40 heads x 128 x 2 bytes
    assert per_token == c.kv_bytes_per_token(2)  # the engine sizes its cache the same way
    assert memory.kv_bytes_per_token(c, "fp8") == per_token / 2


def test_parameter_counts_match_the_published_sizes():
    total = lambda name: sum(ops.num_params(SHAPES[name]()).values())  # noqa: E731
    assert total("llama-2-7b") == pytest.approx(6.74e9, rel=0.005)
    assert total("llama-2-13b") == pytest.approx(13.02e9, rel=0.005)
    assert total("llama-3.1-8b") == pytest.approx(8.03e9, rel=0.005)
    assert total("smollm2-135m") == pytest.approx(134.5e6, rel=0.005)


def test_decode_intensity_falls_as_context_grows():
    c, h100 = SHAPES["llama-2-7b"](), get_device("h100")
    contexts = [128, 512, 2048, 8192]
    steps = [roofline.totals(roofline.place_all(ops.decode_ops(c, 16, n, FP16), h100, "decode"))
             for n in contexts]
    intensity = [s.intensity for s in steps]
    assert all(a > b for a, b in zip(intensity, intensity[1:]))
    # Attention itself stays near 1 FLOP/byte (MHA in fp16 reads 4 bytes of K/V per 4 FLOPs)
    # however long the context: it never leaves the memory-bound side of the ridge.
    for n in contexts:
        attn = next(op for op in ops.decode_ops(c, 16, n, FP16) if op.name == "attention")
        assert 0.5 < attn.intensity <= 1.0
        assert roofline.place(attn, h100, "decode").bound == "memory"
    # ... and its share of the step's bytes grows with the context.
    shares = [next(op.bytes for op in ops.decode_ops(c, 16, n, FP16) if op.name == "attention") / s.bytes
              for n, s in zip(contexts, steps)]
    assert all(a < b for a, b in zip(shares, shares[1:]))


def test_decode_turns_compute_bound_near_the_ridge():
    c, h100 = SHAPES["llama-2-7b"](), get_device("h100")
    b = roofline.decode_crossover(c, h100, 513, FP16)
    assert 295 < b < 400  # weights dominate the bytes, so B ~ ridge plus the activations' share
    rows = roofline.decode_sweep(c, h100, 513, FP16, [b - 1, b])
    assert [r.linears_bound for r in rows] == ["memory", "compute"]
    # At a 4k context every sequence's K/V outweighs the weights' reuse: the step never gets there.
    assert roofline.decode_crossover(c, h100, 4096, FP16, "step") is None


def test_prefill_is_compute_bound_and_decode_memory_bound():
    c = SHAPES["llama-3.1-8b"]()
    r = analyze(c, get_device("h100"), ops.Precision.for_dtype("bf16"), batch=1, prompt=2048)
    assert {op["name"]: op["bound"] for op in r["prefill"]["ops"]}["mlp"] == "compute"
    assert all(op["bound"] == "memory" for op in r["decode"]["ops"])
    # Decode at batch 1 reads every weight once, all but the (untied) embedding table, of which
    # it gathers one row, and the K/V of its 2049 tokens: the floor is those bytes over the bandwidth.
    weights = ops.weight_bytes(c, ops.Precision.for_dtype("bf16")) - c.vocab_size * c.hidden_size * 2
    kv = memory.kv_bytes_per_token(c, "bf16") * 2049
    assert r["decode"]["tpot_floor_s"] == pytest.approx((weights + kv) / 3.35e12, rel=0.005)
    assert r["prefill"]["ttft_floor_s"] > r["decode"]["tpot_floor_s"]


def test_quantized_weights_cut_decode_bytes():
    c, h100 = SHAPES["llama-3.1-8b"](), get_device("h100")
    floor = {d: roofline.totals(roofline.place_all(
        ops.decode_ops(c, 1, 1024, ops.Precision.for_dtype(d)), h100, "decode")).time_s
        for d in ("bf16", "fp8", "int4")}
    assert floor["bf16"] > floor["fp8"] > floor["int4"]
    assert floor["bf16"] / floor["int4"] > 2.5  # the 16-bit LM head and K/V keep it under 16/4.25
    with pytest.raises(InvalidParameter, match="dtype: got 'int3'"):
        ops.Precision.for_dtype("int3")


def test_memory_plan():
    c = SHAPES["llama-2-7b"]()
    plan = memory.plan(c, FP16, get_device("h100").memory_bytes)
    assert plan.weight_bytes == pytest.approx(13.48e9, rel=0.01)
    assert plan.max_kv_tokens == int(plan.kv_budget_bytes // (512 * 1024))
    assert plan.max_batch_by_context[4096] == plan.max_kv_tokens // 4096 > 0
    assert max(plan.max_batch_by_context) == 4096  # no context beyond the model's own
    # A 13B model in fp16 (26 GB) leaves nothing for K/V on a 24 GB card.
    l4 = memory.plan(SHAPES["llama-2-13b"](), FP16, get_device("l4").memory_bytes)
    assert l4.max_kv_tokens == 0 and all(b == 0 for b in l4.max_batch_by_context.values())


# ---- model shapes without weights ---------------------------------------------------------

def test_model_config_from_gguf_metadata_matches_the_built_in_shape():
    c, source = model_config("smollm2-135m")
    assert source.endswith(".gguf")  # the packaged file's own metadata
    shape = SHAPES["smollm2-135m"]()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(c, field) == getattr(shape, field), field


def test_model_config_from_config_json_and_folder(tmp_path):
    cfg = SHAPES["llama-3.1-8b"]().to_hf()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in (str(tmp_path / "config.json"), str(tmp_path)):
        c, _ = model_config(name)
        assert (c.num_kv_heads, c.vocab_size, c.max_position_embeddings) == (8, 128256, 131072)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a usable model config"):
        model_config(str(tmp_path / "bad.json"))
    with pytest.raises(ModelLoadError, match="no such model or config"):
        model_config("/no/such/config.json")


# ---- output and plots ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_result():
    return analyze(SHAPES["llama-2-7b"](), get_device("h100"), FP16, batch=8, prompt=1024,
                   model_name="llama-2-7b")


def test_outputs_by_extension(tmp_path, llama_result):
    data = json.loads(write_output(llama_result, tmp_path / "a.json").read_text())
    assert [op["name"] for op in data["decode"]["ops"]] == list(ops.OP_NAMES)
    assert data["sweep"]["linears_compute_bound_at"] == llama_result["sweep"]["linears_compute_bound_at"]
    csv_lines = write_output(llama_result, tmp_path / "a.csv").read_text().splitlines()
    assert csv_lines[0].startswith("phase,name,flops,bytes") and len(csv_lines) == 1 + 2 * 6
    md = write_output(llama_result, tmp_path / "a.md").read_text()
    assert "| phase | operator |" in md and "TTFT floor" in md
    with pytest.raises(InvalidParameter, match="output: got 'a.txt'"):
        write_output(llama_result, tmp_path / "a.txt")


def test_plots_render_at_the_asked_size(tmp_path, llama_result):
    from PIL import Image

    from tuili.analysis.plots import plot_all, plot_phase_times

    paths = plot_all(llama_result, tmp_path / "roofline.png")
    assert [p.name for p in paths] == ["roofline.png", "roofline-batch.png", "roofline-phases.png"]
    for p in paths:
        assert p.stat().st_size > 10_000
        with Image.open(p) as img:
            assert img.size == (1200, 800)
    small = plot_phase_times({"decode": {"floor": 0.01, "above": 0.02}}, tmp_path / "p.png",
                             size=(640, 480))
    with Image.open(small) as img:
        assert img.size == (640, 480)


# ---- the command line ---------------------------------------------------------------------

def test_cli_analyze_end_to_end(tmp_path):
    out, plot = tmp_path / "smol.json", tmp_path / "smol.png"
    r = run_cli("analyze", "--model", "smollm2-135m", "--device", "h100", "--batch", "4",
                "--prompt", "256", "--output", str(out), "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    for text in ("qkv_proj", "attention", "lm_head", "TTFT floor", "time-per-output-token floor",
                 "KV 22.5 KiB/token", "decode batch sweep"):
        assert text in r.stdout, text
    data = json.loads(out.read_text())
    assert data["batch"] == 4 and data["prompt"] == 256 and data["model"]["layers"] == 30
    assert all(op["bound"] == "memory" for op in data["decode"]["ops"])
    assert plot.exists() and (tmp_path / "smol-batch.png").exists()
    r = run_cli("analyze", "--model", "llama-2-13b", "--device", "tpu")
    assert r.returncode != 0 and "device: got 'tpu'" in r.stderr
    r = run_cli("analyze", "--model", "llama-2-7b", "--prompt", "99999")
    assert r.returncode != 0 and "prompt: got 99999, must be in [1, 4096]" in r.stderr
    r = run_cli("analyze", "--model", "llama-2-7b", "--batch", "0")
    assert r.returncode != 0 and "--batch: got '0', must be an integer >= 1" in r.stderr


def test_cli_analyze_on_measured_ceilings(tmp_path):
    out = tmp_path / "cpu.md"
    r = run_cli("analyze", "--model", "qwen3-0.6b", "--device", "measure", "--dtype", "int4",
                "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "(measured here)" in r.stdout and "weights int4 (head bf16)" in r.stdout
    assert "| phase | operator |" in out.read_text()


def test_cli_bench_embedding(tmp_path):
    out = tmp_path / "emb.json"
    r = run_cli("bench", "op", "embedding", "--tokens", "4,2048", "--vocab", "8192", "--hidden",
                "4096", "--repeats", "3", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "sequential" in r.stdout and "random" in r.stdout and "64 KiB" in r.stdout
    results = json.loads(out.read_text())["results"]
    four = [x for x in results if x["tokens"] == 4]
    assert len(four) == 2 and all(x["bytes_read"] == 64 * 1024 + 4 * 8 for x in four)
    assert all(x["bandwidth"] > 0 for x in results)


# ---- the profiler on a real run -----------------------------------------------------------

@pytest.fixture(scope="module")
def profiled_llm():
    from tuili import LLM

    # One thread: on a shared 2-core machine two threads collapse under a neighbour's load.
    return LLM("smollm2-135m", profile=True, num_threads=1)


def test_profiler_reports_mbu_of_a_real_run(profiled_llm):
    from tuili import SamplingParams
    from tuili.bench.offline import random_prompts

    profiler = profiled_llm.engine.profiler
    profiler.reset()
    prompts = random_prompts(profiled_llm.engine.model_config.vocab_size, 2, 24)
    outs = profiled_llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    s = profiler.summary()
    assert s["prefill"]["tokens"] == 48  # both prompts in one step
    assert s["decode"]["tokens"] == 2 * 11  # the first token comes from the prefill step
    for phase in ("prefill", "decode"):
        assert 0 < s[phase]["mbu"] < 1, s[phase]
        assert 0 < s[phase]["mfu"] < 1, s[phase]
        assert 0 < s[phase]["floor_ratio"] < 1
    # A decode step's bytes are the weights as the engine holds them for it (packed int4 with
    # bf16 scales and zeros, the int8 LM head with its row scales), plus K/V and activations
    # (~2% here); the 16-bit head (56.6 MB where int8 reads 28.4) would not fit the bound.
    model = profiled_llm.engine.runner.model
    held = sum(t.nbytes for m in model.modules() if isinstance(m, Linear)
               for t in m.method.tensors)
    assert model.lm_head.method.name == "int8" and held > 0.106e9 * 5 / 8 + 28.3e6
    per_step = s["decode"]["bytes"] / s["decode"]["steps"]
    assert held < per_step < held * 1.03, (per_step, held)
    snap = profiler.snapshot()
    assert snap["tuili_profile_decode_mbu"] == s["decode"]["mbu"]
    assert "MBU" in profiler.format() and "decode" in profiler.format()


def test_cli_bench_latency_with_profile(tmp_path):
    out = tmp_path / "lat.json"
    r = run_cli("bench", "latency", "--profile", "--num-threads", "1", "--input-len", "16",
                "--output-len", "8",
                "--iters", "1", "--output", str(out), "--plot", str(tmp_path / "phases.png"))
    assert r.returncode == 0, r.stderr
    assert "TTFT" in r.stdout and "MBU" in r.stdout
    data = json.loads(out.read_text())
    assert data["tpot_s"] > 0 and 0 < data["profile"]["decode"]["mbu"] < 1
    assert (tmp_path / "phases.png").stat().st_size > 0
