"""The Triton kernels on the CPU, run by Triton's interpreter (TRITON_INTERPRET=1) in float32, against
the torch references; and compiled for Hopper (sm_90) without a GPU, as the engine launches them.

These catch a kernel's logic and compile errors on a machine without a GPU; tests/gpu measures the
real thing in bf16 on the H100. Skipped where Triton is not installed, or where a GPU is (there the
kernels are already imported compiled, and tests/gpu covers them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.interpreted import IGNORE_SCALAR_READS, use_interpreter

use_interpreter("tuili.kernels.triton_gemv")
pytestmark = IGNORE_SCALAR_READS

from tests.attention_steps import mixed_step_meta, random_llamas  # noqa: E402
from tuili.kernels import reference, triton_attention, triton_gemv, triton_rope  # noqa: E402
from tuili.kernels.triton_gemv import GemvConfig  # noqa: E402
from tuili.layers.rotary import RotaryEmbedding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FMA = GemvConfig(block_n=2, block_k=64)
DOT = GemvConfig(block_n=16, block_k=32, use_dot=True)


def nan(*shape):
    return torch.full(shape, float("nan"))


def fusion_case(m: int, n: int, k: int, fusion: str):
    """(x, w, bias, residual, norm weight, the producer's sums or None, gated) for the fusions
    named in `fusion`, and the torch reference of the fused GEMV."""
    gated = "gated" in fusion
    x = torch.randn(m, k)
    w = torch.randn(2 * n if gated else n, k) * k ** -0.5
    norm_w = torch.rand(k) + 0.5 if "norm" in fusion else None
    bias = torch.randn(n) if "bias" in fusion else None
    res = torch.randn(m, n) if "residual" in fusion else None
    sumsq = x.pow(2).sum(1, keepdim=True) if "sumsq" in fusion and "out" not in fusion else None
    ref = reference.rms_norm(x, norm_w, 1e-5) if norm_w is not None else x
    ref = torch.nn.functional.linear(ref, w, bias)
    ref = reference.silu_and_mul(ref) if gated else ref
    ref = ref + res if res is not None else ref
    return (x, w, bias, res, norm_w, sumsq, gated), ref


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fusion", ["norm", "norm+gated+sumsq", "bias+residual"])
@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_gemv_fusions(m, fusion, config):
    torch.manual_seed(m)
    (x, w, bias, res, norm_w, sumsq, gated), ref = fusion_case(m, 48, 100, fusion)
    out = nan(m, 48)
    triton_gemv.gemv(x, w, bias, res, norm_w, 1e-5, gated, config, out=out, sumsq=sumsq)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fusion", ["norm+sumsq_out", "norm+gated+sumsq", "bias+residual"])
@pytest.mark.parametrize("use_dot", [False, True], ids=["fma", "dot"])
def test_persistent_gemv(monkeypatch, m, fusion, use_dot):
    """The resident-grid GEMV: 3 SMs x 2 programs over more column tiles, so each program
    loops over several (and prefetches past the last one, a partial tile among them); its sum-of-squares parts, one per
    program, add up to the output's."""
    monkeypatch.setattr(triton_gemv, "num_sms", lambda device: 3)
    torch.manual_seed(m + 7)
    n = 46 if not use_dot else 200  # 23 or 13 tiles over 6 programs
    (x, w, bias, res, norm_w, sumsq, gated), ref = fusion_case(m, n, 100, fusion)
    config = GemvConfig(block_n=2 if not use_dot else 16, block_k=128, use_dot=use_dot,
                        programs_per_sm=2)
    out = nan(m, n)
    got = triton_gemv.gemv(x, w, bias, res, norm_w, 1e-5, gated, config, out=out, sumsq=sumsq,
                           want_sumsq="sumsq_out" in fusion)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if "sumsq_out" in fusion:
        parts = got[1]
        assert parts.shape == (m, 6)
        torch.testing.assert_close(parts.sum(1), ref.pow(2).sum(1), atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="block_k"):
        triton_gemv.gemv(x, w, config=GemvConfig(2, 64, programs_per_sm=2), gated=gated)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_and_store(qk_norm):
    heads, kvh, d, tokens = 4, 2, 32, 5
    torch.manual_seed(qk_norm)
    qkv = torch.randn(tokens, heads + 2 * kvh, d)
    rope = RotaryEmbedding(d, 512, 1e4, None, torch.float32, torch.device("cpu"))
    positions = torch.randint(0, 512, (tokens,))
    slots = torch.randperm(32)[:tokens]
    slots[2] = -1
    weights = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if qk_norm else None
    caches = [nan(8, 4, kvh, d) for _ in range(2)]
    expected = [c.clone() for c in caches]
    q = triton_rope.rope_and_store(qkv, positions, rope.cos, rope.sin, *caches, slots, heads,
                                   weights, 1e-6)
    q_ref, k_ref = qkv[:, :heads], qkv[:, heads:heads + kvh]
    if qk_norm:
        q_ref, k_ref = (reference.rms_norm(q_ref, weights[0], 1e-6),
                        reference.rms_norm(k_ref, weights[1], 1e-6))
    cos, sin = rope.lookup(positions)
    q_ref, k_ref = reference.apply_rotary(q_ref, cos, sin), reference.apply_rotary(k_ref, cos, sin)
    keep = slots >= 0
    reference.store_kv(k_ref[keep], qkv[keep, heads + kvh:], *expected, slots[keep])
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(caches, expected):
        torch.testing.assert_close(ours.nan_to_num(7.0), ref.nan_to_num(7.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention(splits):
    """Several sequences (one a padding row of length 0), one split and several, merged in the
    same launch."""
    heads, kvh, d, bs = 4, 2, 32, 4
    torch.manual_seed(splits)
    seq_lens = [1, 17, 0, 40]
    caches = [torch.randn(40, bs, kvh, d) for _ in range(2)]
    tables = torch.randperm(40)[:4 * 10].view(4, 10)
    lens = torch.tensor(seq_lens)
    q = torch.randn(len(seq_lens), heads, d)
    out = nan(*q.shape)
    triton_attention.decode_attention(q, *caches, tables, lens, d ** -0.5, out=out,
                                      config=triton_attention.DecodeConfig(splits, 16))
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.all(out[i] == 0)
            continue
        ref = reference.decode_attention(q[i:i + 1], *caches, tables[i:i + 1], lens[i:i + 1], n,
                                         d ** -0.5)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_prefill_attention():
    """Two sequences in one launch: a fresh prompt and a chunk after a cached prefix."""
    heads, kvh, d, bs = 4, 2, 32, 4
    torch.manual_seed(0)
    new, cached = [9, 5], [0, 7]
    caches = [torch.randn(12, bs, kvh, d) for _ in range(2)]
    tables = torch.randperm(12).view(2, 6)
    q = torch.randn(sum(new), heads, d)
    out = nan(*q.shape)
    seqs = torch.tensor([[0, new[0]], new, cached], dtype=torch.int32)
    triton_attention.prefill_attention(q, *caches, tables, seqs, max(new), d ** -0.5, out)
    for i, start in enumerate((0, new[0])):
        rows = slice(start, start + new[i])
        total = cached[i] + new[i]
        k = reference.gather_kv(caches[0], tables[i], total)
        v = reference.gather_kv(caches[1], tables[i], total)
        ref = reference.prefill_attention(q[rows], k[cached[i]:], v[cached[i]:], *caches, tables[i],
                                          cached[i], d ** -0.5)
        torch.testing.assert_close(out[rows], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_window(splits):
    """A sliding window: each sequence's last `window` keys alone (one shorter than the window),
    as full attention over just those keys."""
    heads, kvh, d, bs, window = 4, 2, 32, 4, 6
    torch.manual_seed(splits)
    seq_lens = [3, 17, 40]
    caches = [torch.randn(40, bs, kvh, d) for _ in range(2)]
    tables = torch.randperm(40)[:3 * 10].view(3, 10)
    lens = torch.tensor(seq_lens)
    q = torch.randn(len(seq_lens), heads, d)
    out = nan(*q.shape)
    triton_attention.decode_attention(q, *caches, tables, lens, d ** -0.5, out=out, window=window,
                                      config=triton_attention.DecodeConfig(splits, 4))
    ref = reference.decode_attention(q, *caches, tables, lens, max(seq_lens), d ** -0.5, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(seq_lens):
        first = max(n - window, 0)
        k, v = (reference.gather_kv(c, tables[i], n, first) for c in caches)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[i][:, None], k.transpose(0, 1), v.transpose(0, 1), scale=d ** -0.5, enable_gqa=True)
        torch.testing.assert_close(ref[i], alone[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d, bs, window, new, cached, kvh", [
    (32, 4, 7, [20, 5], [0, 140], 2),  # a chunk after a prefix long enough to skip key tiles
    # windows narrower than a query tile (the tiles for head dims 32 and 256): a tile's later
    # rows see none of the keys of its first key steps, which must add nothing (not NaN)
    (32, 16, 7, [150, 70], [0, 200], 1),
    (256, 16, 1, [150, 70], [0, 200], 1),
    (256, 16, 64, [150, 70], [0, 200], 1)])
def test_prefill_attention_window(d, bs, window, new, cached, kvh):
    """A sliding window in prefill: a fresh prompt longer than the window, and a chunk after a
    cached prefix; the last query sees exactly its window's keys."""
    heads = 2 * kvh
    torch.manual_seed(window)
    lens = [c + n for c, n in zip(cached, new)]
    widths = [-(-n // bs) for n in lens]
    num_blocks = sum(widths) + 3
    caches = [torch.randn(num_blocks, bs, kvh, d) for _ in range(2)]
    blocks = torch.randperm(num_blocks)
    tables = torch.zeros(2, max(widths), dtype=torch.long)
    tables[0, :widths[0]], tables[1, :widths[1]] = blocks[:widths[0]], blocks[widths[0]:sum(widths)]
    q = torch.randn(sum(new), heads, d)
    out = nan(*q.shape)
    seqs = torch.tensor([[0, new[0]], new, cached], dtype=torch.int32)
    triton_attention.prefill_attention(q, *caches, tables, seqs, max(new), d ** -0.5, out,
                                       window=window)
    for i, start in enumerate((0, new[0])):
        rows = slice(start, start + new[i])
        total = lens[i]
        k = reference.gather_kv(caches[0], tables[i], total)
        v = reference.gather_kv(caches[1], tables[i], total)
        ref = reference.prefill_attention(q[rows], k[cached[i]:], v[cached[i]:], *caches, tables[i],
                                          cached[i], d ** -0.5, window)
        torch.testing.assert_close(out[rows], ref, atol=1e-5, rtol=1e-5)
        last = torch.nn.functional.scaled_dot_product_attention(
            q[rows][-1][:, None], k[total - window:].transpose(0, 1),
            v[total - window:].transpose(0, 1), scale=d ** -0.5, enable_gqa=True)
        torch.testing.assert_close(ref[-1], last[:, 0], atol=1e-5, rtol=1e-5)


def test_argmax():
    """First index on ties within a chunk and across chunks, in one launch (also written to a
    second tensor when asked); the counters the chunks arrive on are left at 0, so a second
    launch agrees."""
    from tuili.kernels import triton_sampling

    torch.manual_seed(0)
    vocab = 3 * triton_sampling.CHUNK + 5
    x = torch.randn(3, vocab).to(torch.bfloat16).float()  # many exact ties
    x[0, 10] = x[0, vocab - 1] = x[0].max() + 1  # across chunks
    x[1] = float("-inf")
    x[1, 7] = x[1, 9] = 0.0  # within a chunk
    got = triton_sampling.argmax(x)
    assert torch.equal(got, x.argmax(-1))
    also = torch.full((3,), -1)
    assert torch.equal(triton_sampling.argmax(x, also), got)
    assert torch.equal(also, got)


def test_sample(monkeypatch):
    """Every filter kind in one launch (the whole row sorted, as a top_p row without top_k needs):
    no token outside the torch path's support, greedy rows take the argmax, frequencies near the
    distribution; the same tokens when the candidates are cut into several chunks; a top_k row
    draws the same token from topk candidates as from the sort."""
    from tuili import SamplingParams
    from tuili.engine.request import Request
    from tuili.engine.sampler import Sampler, filtered_probs
    from tuili.kernels import triton_sampling

    torch.manual_seed(0)
    vocab, draws = 300, 64
    kinds = [dict(temperature=0.8), dict(top_k=20), dict(temperature=0.7, top_p=0.8),
             dict(top_k=50, top_p=0.9, seed=5), dict(min_p=0.1), dict(temperature=0)]
    params = [SamplingParams(**k) for k in kinds]
    reqs = [Request(f"{i}.{j}", [1], p, frozenset(), p.seed and p.seed + j)
            for i, p in enumerate(params) for j in range(draws)]
    logits = torch.randn(vocab) * 2
    x = logits.repeat(len(reqs), 1)
    floats, ints, width = Sampler(0, x.device).row_params(reqs, vocab)
    assert width == vocab
    f, i = torch.tensor(floats), torch.tensor(ints)
    rows = (f[0], i[0], f[1], f[2], i[1])
    tokens = triton_sampling.sample(x, x.argmax(-1), *rows, width).view(len(kinds), draws)
    expected = filtered_probs(logits[None].repeat(len(kinds), 1), params)
    expected /= expected.sum(-1, keepdim=True)
    for kind, got, ref in zip(kinds, tokens, expected):
        freq = torch.bincount(got, minlength=vocab).double() / draws
        assert not (freq[ref == 0] > 0).any(), kind
        noise = 0.5 * (2 / torch.pi) ** 0.5 * (ref * (1 - ref) / draws).sqrt().sum()
        assert 0.5 * (freq - ref).abs().sum() <= 2 * noise + 0.02, kind
    assert (tokens[-1] == logits.argmax()).all()
    monkeypatch.setattr(triton_sampling, "NUCLEUS_BLOCK", 64)  # 5 chunks a row
    chunked = triton_sampling.sample(x, x.argmax(-1), *rows, width).view(len(kinds), draws)
    assert torch.equal(chunked, tokens)
    seeded = slice(3 * draws, 4 * draws)  # top_k 50: 64 topk candidates are enough
    narrow = triton_sampling.sample(x[seeded], x[seeded].argmax(-1), *(r[seeded] for r in rows), 64)
    assert torch.equal(narrow, tokens[3])
    # Rows with no filter (temperature, min_p, greedy) alone: one race launch, no candidates.
    plain = [0, 4, 5]
    take = torch.cat([torch.arange(k * draws, (k + 1) * draws) for k in plain])
    assert Sampler(0, x.device).row_params([reqs[j] for j in take.tolist()], vocab)[2] == 1
    alone = triton_sampling.sample(x[take], x[take].argmax(-1), *(r[take] for r in rows), 1)
    for k, got in zip(plain, alone.view(len(plain), draws)):
        assert (expected[k][got] > 0).all(), kinds[k]
    distinct = (1 - (1 - expected[0]) ** draws).sum()  # expected distinct tokens in the draws
    assert len(set(alone[:draws].tolist())) >= 0.5 * distinct
    assert (alone[-draws:] == logits.argmax()).all()


def test_decode_step_through_the_gpu_code_path(monkeypatch):
    """A small Llama's step of two decodes and a 3-token prefill chunk (5 rows: the decode GEMVs)
    with every GPU-only branch taken (GEMVs with the norms, the rope kernel, Triton decode and
    prefill attention) matches the torch path: logits and the K/V written to the cache."""
    import tuili.layers.backend as backend
    from tuili.models.config import ModelConfig

    torch.manual_seed(0)
    c = ModelConfig("LlamaForCausalLM", vocab_size=256, hidden_size=256, intermediate_size=256,
                    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, attention_bias=True)
    model, gpu_model = random_llamas(c)
    rope = RotaryEmbedding(64, 64, 1e4, None, torch.float32, torch.device("cpu"))
    start = [torch.randn(8, 4, 2, 64) for _ in range(2)]
    meta = mixed_step_meta(rope)

    def step(model):
        attn = model.attention_layers()[0]
        attn.k_cache, attn.v_cache = (t.clone() for t in start)
        with torch.inference_mode():
            ids = torch.tensor([7, 100, 3, 50, 201])
            return model.logits(model(ids, meta)), attn.k_cache, attn.v_cache

    expected = step(model)
    calls = []
    gemv = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **k: calls.append(a[1].shape) or gemv(*a, **k))
    monkeypatch.setattr(backend, "GEMV_DTYPES", (torch.float32,))  # the interpreter's dtype
    for ours, ref in zip(step(gpu_model), expected):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert len(calls) == 5  # qkv, o, gate_up, down, the LM head: all GEMVs


def test_kernels_compile_for_hopper():
    """Every kernel as the engine launches it for Llama-3.1-8B and SmolLM2 shapes (1 and 8 rows,
    with programmatic dependent launch) compiles for sm_90, through ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiled" in run.stdout
