"""Each Triton kernel against its torch reference on fresh random inputs, outputs poisoned first."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tests.gpu.random_models import random_cache, random_tables  # noqa: E402
from tuili.kernels import reference, triton_attention  # noqa: E402


@pytest.mark.parametrize("heads,kvh,d", [(32, 8, 128), (16, 8, 128), (9, 3, 64), (8, 1, 256),
                                         (12, 12, 64)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_attention_matches_reference(heads, kvh, d, block_size):
    torch.manual_seed(heads * 1000 + block_size)
    seq_lens = [1, 7, block_size, block_size + 1, 333, 1024]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 5
    k_cache, v_cache = random_cache(num_blocks, block_size, kvh, d)
    tables = random_tables(seq_lens, block_size, num_blocks)
    lens = torch.tensor(seq_lens, device="cuda")
    q = torch.randn(len(seq_lens), heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, out=out)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                     max(seq_lens), d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_decode_attention_long_context_and_padding_rows():
    heads, kvh, d, bs = 32, 8, 128, 16
    seq_lens = [32768, 0, 5]  # a 32k context, a padding row, a short one
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 1
    k_cache, v_cache = random_cache(num_blocks, bs, kvh, d)
    tables = random_tables([max(n, 1) for n in seq_lens], bs, num_blocks)
    lens = torch.tensor(seq_lens, device="cuda")
    q = torch.randn(3, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, out=out)
    for i in (0, 2):
        ref = reference.decode_attention(q[i:i + 1].float(), k_cache.float(), v_cache.float(),
                                         tables[i:i + 1], lens[i:i + 1], seq_lens[i], d ** -0.5)
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=2e-2, rtol=2e-2)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("batch,max_len", [(1, None), (1, 200), (64, None), (40, 4097)])
def test_decode_attention_split_choices(batch, max_len):
    """One split (large batch), many, and few (a short known length) give the same answer."""
    heads, kvh, d, bs = 32, 8, 128, 16
    torch.manual_seed(batch)
    seq_lens = torch.randint(1, max_len or 3000, (batch,)).tolist()
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 2
    k_cache, v_cache = random_cache(num_blocks, bs, kvh, d)
    tables = random_tables(seq_lens, bs, num_blocks)
    lens = torch.tensor(seq_lens, device="cuda")
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, out=out,
                                      max_len=max_len)
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                     max(seq_lens), d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def assert_decode_rows(out, q, k_cache, v_cache, tables, lens):
    """Each row against the reference alone (its own length); padding rows must be zeros."""
    d = q.shape[-1]
    for i, n in enumerate(lens.tolist()):
        if n == 0:
            assert torch.all(out[i] == 0), f"padding row {i} not zeroed"
            continue
        ref = reference.decode_attention(q[i:i + 1].float(), k_cache.float(), v_cache.float(),
                                         tables[i:i + 1], lens[i:i + 1], n, d ** -0.5)
        torch.testing.assert_close(out[i:i + 1].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("config", [(64, 32, 4, 2), (16, 128, 8, 2), (32, 64, 8, 4), (8, 16, 4, 3),
                                    (1, 64, 4, 3)])
def test_decode_attention_launch_shapes(config):
    """Every split count, key block, warp count and pipeline depth the tuning may pick."""
    heads, kvh, d, bs = 32, 8, 128, 16
    torch.manual_seed(sum(config))
    seq_lens = [8192, 0, 1, 700]
    num_blocks = sum(-(-max(n, 1) // bs) for n in seq_lens) + 2
    k_cache, v_cache = random_cache(num_blocks, bs, kvh, d)
    tables = random_tables([max(n, 1) for n in seq_lens], bs, num_blocks)
    lens = torch.tensor(seq_lens, device="cuda")
    q = torch.randn(len(seq_lens), heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5, out=out,
                                      config=triton_attention.DecodeConfig(*config))
    assert_decode_rows(out, q, k_cache, v_cache, tables, lens)


def test_decode_attention_repeats_and_graph_replays_reuse_tickets():
    """One launch merges its own splits: repeated calls agree bit for bit, and a captured graph
    replayed over new lengths and queries stays right (each launch leaves its counters at 0)."""
    heads, kvh, d, bs = 32, 8, 128, 16
    torch.manual_seed(11)
    capacity = [8192, 3000, 300]
    num_blocks = sum(-(-n // bs) for n in capacity) + 1
    k_cache, v_cache = random_cache(num_blocks, bs, kvh, d)
    tables = random_tables(capacity, bs, num_blocks)
    lens = torch.tensor([8192, 0, 77], device="cuda")
    q = torch.randn(3, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))

    def run():
        return triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5,
                                                 out=out)

    first = run().clone()
    for _ in range(3):
        out.fill_(float("nan"))
        assert torch.equal(run(), first)
    assert_decode_rows(out, q, k_cache, v_cache, tables, lens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for new_lens in ([3000, 129, 0], [1, 2999, 300], [8192, 0, 77]):
        lens.copy_(torch.tensor(new_lens))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_decode_rows(out, q, k_cache, v_cache, tables, lens)
    assert torch.all(triton_attention._tickets(q.device) == 0)


def test_decode_attention_sees_the_key_stored_just_before_it():
    """The decode step's launch order, captured in a graph as the engine runs it (with programmatic
    dependent launch on Hopper): rotary + K/V store by the rope kernel, then attention. Each sequence's newest key and value hold NaN until the first kernel
    stores them; the attention must read them after that."""
    from tuili.kernels import triton_rope
    from tuili.layers.rotary import RotaryEmbedding

    heads, kvh, d, bs = 32, 8, 128, 16
    torch.manual_seed(5)
    seq_lens = [1, 64, 65, 100, 2049, 8192]  # one split; several, the last one short; all 32
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 1
    caches = list(random_cache(num_blocks, bs, kvh, d))
    tables = random_tables(seq_lens, bs, num_blocks)
    lens = torch.tensor(seq_lens, device="cuda")
    positions = lens - 1
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    qkv = torch.randn(len(seq_lens), heads + 2 * kvh, d, device="cuda", dtype=torch.bfloat16)
    rope = RotaryEmbedding(d, 8192, 5e5, None, torch.bfloat16, torch.device("cuda"))
    out = torch.empty(len(seq_lens), heads, d, device="cuda", dtype=torch.bfloat16)

    def step():
        q = triton_rope.rope_and_store(qkv, positions, rope.cos, rope.sin, *caches, slots, heads)
        triton_attention.decode_attention(q, *caches, tables, lens, d ** -0.5, out=out)
        return q

    q = step()  # compiles, and allocates the split counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = step()
    for _ in range(3):
        for c in caches:
            c.view(-1, kvh, d)[slots] = float("nan")
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        assert_decode_rows(out, q, *caches, tables, lens)


@pytest.mark.parametrize("heads,kvh,d", [(32, 8, 128), (9, 3, 64), (8, 1, 256), (16, 16, 64)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_prefill_attention_matches_reference(heads, kvh, d, block_size):
    """Several sequences in one launch: fresh prompts, cached prefixes and chunks of every size."""
    torch.manual_seed(heads + d + block_size)
    new = [1, 7, 130, 300, 64, 1]  # tokens computed this step
    context = [0, 0, 0, 45, block_size * 3, 1000]  # tokens already in the cache
    totals = [c + n for c, n in zip(context, new)]
    num_blocks = sum(-(-t // block_size) for t in totals) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, kvh, d)
    tables = random_tables(totals, block_size, num_blocks)
    rows = sum(new)
    q = torch.randn(rows + 2, heads, d, device="cuda", dtype=torch.bfloat16)  # 2 decode rows first
    k = torch.randn(rows + 2, kvh, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(rows + 2, kvh, d, device="cuda", dtype=torch.bfloat16)
    starts, slots, row = [], [], 2
    for i, (c, n) in enumerate(zip(context, new)):
        starts.append(row)
        for p in range(c, c + n):
            slots.append(tables[i, p // block_size].item() * block_size + p % block_size)
        row += n
    reference.store_kv(k[2:], v[2:], k_cache, v_cache, torch.tensor(slots, device="cuda"))
    seqs = torch.tensor([starts, new, context], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    triton_attention.prefill_attention(q, k_cache, v_cache, tables, seqs, max(new), d ** -0.5, out)
    assert out[:2].isnan().all()  # rows of other sequences are left alone
    for i, (start, c, n) in enumerate(zip(starts, context, new)):
        r = slice(start, start + n)
        ref = reference.prefill_attention(q[r].float(), k[r].float(), v[r].float(),
                                          k_cache.float(), v_cache.float(), tables[i], c, d ** -0.5)
        torch.testing.assert_close(out[r].float(), ref, atol=2e-2, rtol=2e-2)


def test_prefill_attention_long_prompt():
    heads, kvh, d, bs, n = 32, 8, 128, 16, 8192
    k_cache, v_cache = random_cache(n // bs + 1, bs, kvh, d)
    tables = random_tables([n], bs, n // bs + 1)
    q = torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16)
    seqs = torch.tensor([[0], [n], [0]], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    triton_attention.prefill_attention(q, k_cache, v_cache, tables, seqs, n, d ** -0.5, out)
    keys = reference.gather_kv(k_cache, tables[0], n)
    values = reference.gather_kv(v_cache, tables[0], n)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), is_causal=True,
        scale=d ** -0.5, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kvh,d,block_size", [(8, 128, 16), (3, 64, 1), (1, 256, 32)])
def test_store_kv_matches_reference(kvh, d, block_size):
    tokens, num_blocks = 37, 64
    qkv = torch.randn(tokens, 4 * kvh + 2 * kvh, d, device="cuda", dtype=torch.bfloat16)
    k, v = qkv[:, 4 * kvh:5 * kvh], qkv[:, 5 * kvh:]  # strided views, as the model passes them
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[3] = -1  # a padding row is skipped
    ours = [torch.full((num_blocks, block_size, kvh, d), float("nan"), device="cuda",
                       dtype=torch.bfloat16) for _ in range(2)]
    ref = [c.clone() for c in ours]
    triton_attention.store_kv(k, v, ours[0], ours[1], slots)
    keep = slots >= 0
    reference.store_kv(k[keep], v[keep], ref[0], ref[1], slots[keep])
    for a, b in zip(ours, ref):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


from tuili.kernels import triton_fused  # noqa: E402


def poisoned(shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("rows,n", [(1, 576), (37, 4096), (5, 1024), (3, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows, n, with_residual):
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x) if with_residual else None
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    if with_residual:
        out, new_res = triton_fused.rms_norm(x, w, 1e-5, res)
        ref_res = x + res
        assert torch.equal(new_res, ref_res)
        ref = reference.rms_norm(ref_res, w, 1e-5)
    else:
        out, ref = triton_fused.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.97  # the same roundings: nearly all bits equal


@pytest.mark.parametrize("rows,d", [(1, 1536), (33, 14336), (4, 3072)])
def test_silu_and_mul_matches_reference(rows, d):
    x = torch.randn(rows, 2 * d, device="cuda", dtype=torch.bfloat16)
    out, ref = triton_fused.silu_and_mul(x), reference.silu_and_mul(x)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.97


@pytest.mark.parametrize("heads,d", [(9 + 3, 64), (32 + 8, 128), (8 + 1, 256)])
def test_rotary_matches_reference(heads, d):
    from tuili.layers.rotary import RotaryEmbedding

    tokens = 41
    qkv = torch.randn(tokens, heads + 4, d, device="cuda", dtype=torch.bfloat16)
    x = qkv[:, :heads]  # a strided view, as the model passes q and k
    rope = RotaryEmbedding(d, 4096, 500000.0, None, torch.bfloat16, torch.device("cuda"))
    cos, sin = rope.lookup(torch.randint(0, 4096, (tokens,), device="cuda"))
    out, ref = triton_fused.apply_rotary(x, cos, sin), reference.apply_rotary(x, cos, sin)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert (out == ref).float().mean() > 0.97


@pytest.mark.parametrize("heads,kvh,d,qk_norm", [(32, 8, 128, False), (9, 3, 64, False),
                                                 (8, 1, 256, False), (16, 8, 128, True),
                                                 (9, 3, 64, True)])
@pytest.mark.parametrize("tokens", [1, 41])
def test_rope_and_store_matches_reference(heads, kvh, d, qk_norm, tokens):
    """Norm (Qwen3), rotary and the K/V store in one launch against the reference ops in turn."""
    from tuili.kernels import triton_rope
    from tuili.layers.rotary import RotaryEmbedding

    torch.manual_seed(heads + d + tokens)
    bs, num_blocks = 16, 8
    qkv = torch.randn(tokens, heads + 2 * kvh, d, device="cuda", dtype=torch.bfloat16)
    rope = RotaryEmbedding(d, 4096, 1e6, None, torch.bfloat16, torch.device("cuda"))
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos, sin = rope.lookup(positions)
    slots = torch.randperm(num_blocks * bs, device="cuda")[:tokens]
    if tokens > 1:
        slots[[3, 17]] = -1  # padding rows: nothing stored
    weights = (torch.randn(d, device="cuda", dtype=torch.bfloat16),
               torch.randn(d, device="cuda", dtype=torch.bfloat16)) if qk_norm else None
    caches = [poisoned((num_blocks, bs, kvh, d)) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = triton_rope.rope_and_store(qkv, positions, rope.cos, rope.sin, *caches, slots, heads,
                                   weights, 1e-6)
    q_ref, k_ref = qkv[:, :heads], qkv[:, heads:heads + kvh]
    if qk_norm:
        q_ref = reference.rms_norm(q_ref, weights[0], 1e-6)
        k_ref = reference.rms_norm(k_ref, weights[1], 1e-6)
    q_ref = reference.apply_rotary(q_ref, cos, sin)
    k_ref = reference.apply_rotary(k_ref, cos, sin)
    keep = slots >= 0
    reference.store_kv(k_ref[keep], qkv[keep, heads + kvh:], *ref_caches, slots[keep])
    assert torch.equal(caches[1].nan_to_num(7.0), ref_caches[1].nan_to_num(7.0))  # v: a copy
    pairs = [(q, q_ref), (caches[0].nan_to_num(7.0), ref_caches[0].nan_to_num(7.0))]
    for ours, ref in pairs:
        assert not ours.isnan().any()
        if not qk_norm:
            assert torch.equal(ours, ref)  # rotary alone: every bit as the reference
        else:
            # The norm's fp32 sum of squares is added in another order than torch's, which
            # can move a value across a bf16 rounding boundary, rarely.
            torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1e-2)
            assert (ours == ref).float().mean() > 0.999


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 49152), (8, 151936), (5, 100), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(rows, vocab, dtype):
    """First index on ties (equal maxima in one chunk and across chunks), -inf rows, bf16-like
    plateaus of equal values; bf16 logits read as they are. Repeated launches and graph replays
    agree (the last chunk of each row leaves its counter at 0)."""
    from tuili.kernels import triton_sampling

    torch.manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, device="cuda").to(torch.bfloat16).to(dtype)  # many exact ties
    x[0, vocab // 2] = x[0, vocab - 1] = x[0].max() + 1  # a tie between chunks
    if rows > 1:
        x[1] = float("-inf")
        x[1, vocab - 2] = x[1, vocab - 3] = 0.0  # a tie within a chunk
    got = triton_sampling.argmax(x)
    assert torch.equal(got, x.float().argmax(-1))
    assert torch.equal(triton_sampling.argmax(x), got)
    assert torch.equal(triton_sampling.argmax(x[:, :vocab - 1]), x[:, :vocab - 1].float().argmax(-1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_sampling.argmax(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x, dtype=torch.float32).to(torch.bfloat16).to(dtype))
        captured.fill_(-1)
        graph.replay()
        assert torch.equal(captured, x.float().argmax(-1))
