"""The CPU decode path's shortcuts against the references they stand in for: the folded rotary
(bit for bit), one query's attention in float32 matmuls (against SDPA's decode_attention), and the
int8 LM head (against the matmul of its own dequantized weight, and of the 16-bit one above
MAX_ROWS)."""

import pytest
import torch
import torch.nn.functional as F

from tuili.kernels import reference
from tuili.layers.linear import Linear
from tuili.quantization.int8 import CPU_KERNEL, Int8HeadMethod


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7])
def test_folded_rotary_is_bitwise_apply_rotary(dtype, tokens):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 15, 64, generator=g).to(dtype)
    angles = torch.rand(tokens, 1, 64, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x = qkv[:, :12]  # q and k of a merged QKV output: a strided view when tokens > 1
    ours = reference.apply_rotary_folded(x, cos, reference.fold_sin(sin))
    assert torch.equal(ours, reference.apply_rotary(x, cos, sin))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("length,window", [(1, 0), (37, 0), (37, 10), (70, 0)])
def test_single_decode_matches_decode_attention(dtype, tol, length, window):
    g = torch.Generator().manual_seed(1)
    blocks, bs, kvh, d, heads = 12, 16, 3, 64, 9
    k_cache = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks, bs, kvh, d, generator=g).to(dtype)
    table = torch.randperm(blocks, generator=g)[None, :]  # blocks out of order
    q = torch.randn(1, heads, d, generator=g).to(dtype)
    ref = reference.decode_attention(q, k_cache, v_cache, table, torch.tensor([length]), length,
                                     d ** -0.5, window)
    slots = reference.cache_slots(table[0], length, bs)
    assert slots.tolist() == [int(table[0, t // bs]) * bs + t % bs for t in range(length)]
    ours = reference.single_decode(q[0], k_cache, v_cache,
                                   slots[-window:] if window else slots, d ** -0.5)
    assert ours.dtype == dtype and ours.shape == q[0].shape
    assert (ours.float() - ref[0].float()).abs().max() <= tol


@pytest.mark.skipif(not CPU_KERNEL, reason="this torch has no int8 CPU kernel")
def test_int8_head_matches_its_dequantized_weight():
    g = torch.Generator().manual_seed(2)
    vocab, hidden = 1000, 576
    head = Linear(hidden, vocab).to(torch.bfloat16)
    head.weight.data.copy_(torch.randn(vocab, hidden, generator=g) * 0.05)
    method = Int8HeadMethod(head.weight.data)
    dequantized = method.q.float() * method.scale.float()[:, None]
    # Round to nearest against the kernel's own (bf16) scales: half a step off at most.
    err = (dequantized - head.weight.float()).abs().amax(-1)
    assert (err <= method.scale.float() * 0.5 + 1e-6).all()
    head.method = method
    for rows in (1, 3, Int8HeadMethod.MAX_ROWS):
        x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
        ref = x.float() @ dequantized.t()
        out = head(x)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 0.01 * ref.abs().max()
    x = torch.randn(Int8HeadMethod.MAX_ROWS + 1, hidden, generator=g).to(torch.bfloat16)
    assert torch.equal(head(x), F.linear(x, head.weight))  # large steps: the 16-bit weight


@pytest.fixture(scope="module")
def smollm2_int4():
    """The default CPU path: bfloat16, the GGUF's 4-bit layers packed, the int8 head."""
    from tuili import LLM

    llm = LLM("smollm2-135m", dtype="bfloat16", num_kv_blocks=64)
    if llm.engine.runner.model.layers[0].mlp.down_proj.method.name != "int4":
        pytest.skip("this torch has no int4 CPU kernel")
    return llm


def test_straight_line_decode_is_bitwise_the_module_path(smollm2_int4, monkeypatch):
    """models/cpu_decode.py runs a single stream's decode steps with the modules' very ops:
    the same tokens and the same logprobs, bit for bit, as the layer-by-layer path. Its kept
    float32 keys start small here (so they grow), and must be dropped between sequences: one
    prompt after another (the second in the first's freed blocks), then a batch of two whose
    longer one decodes alone once the other stops. (Its torch ops; the fused C++ layers, which
    round otherwise, are tested below.)"""
    from tuili import SamplingParams
    from tuili.models import cpu_decode

    model = smollm2_int4.engine.runner.model
    fast = model.cpu_decode
    assert fast is not None
    monkeypatch.setattr(fast, "fused", None)
    monkeypatch.setattr(cpu_decode, "HISTORY_ROWS", 16)
    calls = []  # per fast step: whether it found no kept keys (a sequence's first)
    monkeypatch.setattr(fast, "run",
                        lambda *a, run=fast.run: calls.append(fast._known is None) or run(*a))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    a = "Once upon a time, in a land far away, there lived a dragon who"
    b = "List three colours:\n1."

    def runs():
        outs = [smollm2_int4.generate([p], params)[0] for p in (a, b)]
        outs += smollm2_int4.generate([a, b], [short, params])
        return [(o.outputs[0].token_ids, [(p.logprob, p.top) for p in o.outputs[0].logprobs])
                for o in outs]

    ours = runs()
    assert len(calls) == 2 * 15 + (15 - 3)  # every lone decode step (not prefills, batches)
    assert sum(calls) == 3  # each run's first fast step, after a prefill or a batch
    monkeypatch.setattr(model, "cpu_decode", None)
    assert ours == runs()


def test_fused_decode_layers_close_to_the_ops(smollm2_int4, monkeypatch):
    """Where kernels/cpu_vnni builds, a single stream's decode runs one C++ call a layer (a
    float32 residual stream where the ops' is bf16, both GEMVs' inputs int8): on the same cache,
    each step's next-token distribution close to the torch ops' (measured on these 24 steps:
    the same argmax at 23, total variation distance 0.0002-0.10; hidden states some % apart in
    norm), and the kept keys carried from step to step as the ops carry them."""
    from tuili import SamplingParams

    model = smollm2_int4.engine.runner.model
    fast = model.cpu_decode
    if fast.fused is None:
        pytest.skip("no AVX512-VNNI kernels here")
    steps = []

    def both(input_ids, meta, run=fast.run):
        ours = run(input_ids, meta)
        kept = [(k.clone(), v.clone()) for k, v in fast._history]
        fast.forget()  # the ops path takes every key again from the cache, its own new one too
        ops = fast._run_ops(input_ids, meta, fast._caches())
        n = meta.max_decode_len
        assert all(torch.equal(k[:n - 1], k2[:n - 1]) and torch.equal(v[:n - 1], v2[:n - 1])
                   for (k, v), (k2, v2) in zip(kept, fast._history))
        steps.append([model.logits(h).float().log_softmax(-1)[0] for h in (ours, ops)])
        return ours

    monkeypatch.setattr(fast, "run", both)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    smollm2_int4.generate(["The capital of France is"], params)
    smollm2_int4.generate(["def fibonacci(n):"], params)
    assert len(steps) == 24
    same = sum(int(ours.argmax()) == int(ops.argmax()) for ours, ops in steps)
    spread = [float((ours.exp() - ops.exp()).abs().sum() / 2) for ours, ops in steps]
    assert same >= 22 and max(spread) < 0.2, (same, spread)


def test_quantize_lm_head_option(smollm2_int4, gguf_path):
    """quantize_lm_head unset follows the file: SmolLM2's head (its tied token_embd) is stored
    Q8_0, so the int4 path runs it in int8; false keeps it 16-bit (and the layers int4); the
    flag parses as --quantize-lm-head / --no-quantize-lm-head, unset by default."""
    import argparse

    from gguf import GGMLQuantizationType as Q

    from tuili.models import loader
    from tuili.models.gguf_file import open_gguf
    from tuili.options import add_engine_options, engine_options

    gguf = open_gguf(gguf_path)
    assert "output.weight" not in gguf.tensors
    assert gguf.tensors["token_embd.weight"].tensor_type == Q.Q8_0 and gguf.head_is_quantized()
    assert isinstance(smollm2_int4.engine.runner.model.lm_head.method, Int8HeadMethod)
    model = loader.load("smollm2-135m", torch.bfloat16, torch.device("cpu"),
                        quantization="auto", quantize_lm_head=False).model
    assert model.lm_head.method.name == "none" and model.layers[0].mlp.down_proj.method.name == "int4"
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    for argv, want in (([], None), (["--quantize-lm-head"], True),
                       (["--no-quantize-lm-head"], False)):
        assert engine_options(parser.parse_args(argv))["quantize_lm_head"] is want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_argmax_of_16_bit_logits_is_theirs(dtype):
    """The sampler's CPU argmax of 16-bit logits goes through float32: the same index as the
    16-bit argmax, ties (the first of equal values), -inf and NaN rows included."""
    from tuili.engine.sampler import row_argmax

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 49152, generator=g) * 4).to(dtype)
    x[1] = x[1].round()  # many ties at the top
    x[2, 7], x[2, 9] = 100, 100
    x[3, :100] = float("-inf")
    x[4, 50], x[4, 60] = float("nan"), float("nan")
    x[5] = float("-inf")
    assert torch.equal(row_argmax(x), x.argmax(-1))


@pytest.mark.parametrize("length", [1, 80, 511, 4096])
def test_attention_matmuls_same_bits_on_one_thread(length):
    """CpuDecode runs the attention's bmm and softmax on one thread whatever torch's count:
    the same bits as on two."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 3, 64, generator=g).bfloat16().float()
    k, v = (torch.randn(length, 3, 64, generator=g).bfloat16().float() for _ in range(2))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = torch.softmax(torch.bmm(q, k.permute(1, 2, 0)).mul_(0.125), -1)
            outs.append((p, torch.bmm(p, v.transpose(0, 1))))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
