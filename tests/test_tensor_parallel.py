"""Tensor parallelism on the CPU (gloo): SmolLM2 over 3 ranks (9 heads, 3 KV heads: one each)
against one rank, and a Llama-shaped model with one KV head over 2 ranks (replicated); a rank
killed mid-service stops the engine with an error, not a hang."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.conftest import MODEL
from tests.server_process import ROOT, TuiliProcess
from tests.tiny_models import tiny_llama
from tuili import LLM
from tuili.errors import RankFailure
from tuili.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
TIMEOUT_S = 20.0


# ---- what a rank reads of a GGUF file ---------------------------------------------------------

def test_a_rank_reads_and_decodes_only_its_part_of_a_gguf_tensor(gguf_path, monkeypatch):
    """Each form (dequantized, 4-bit unpacked, the file's blocks) of a rank's rows (q with its
    rope order, the embedding) and columns (down) equals the whole tensor's cut, and decoding
    columns on block boundaries decodes only their blocks."""
    from tuili.models import gguf_file
    from tuili.quantization.gguf import GgufTensor

    g = copy.copy(gguf_file.open_gguf(gguf_path))
    whole = {}
    for form in ("float", "int4", "blocks"):  # decoded whole: the reference (the embedding once)
        g.tensors = {n: gguf_file.open_gguf(gguf_path).tensors[n] for n in (
            "blk.0.attn_q.weight", "blk.0.ffn_down.weight") + ("token_embd.weight",) * (
            form == "float")}
        whole[form] = dict(g.weights(int4=form == "int4", blocks=form == "blocks"))
    g = gguf_file.open_gguf(gguf_path)
    lazy = {form: dict(g.weights(int4=form == "int4", blocks=form == "blocks", lazy=True))
            for form in ("float", "int4", "blocks")}
    layer = "model.layers.0."
    cuts = [(layer + "self_attn.q_proj.weight", 0, 192, 192),  # rank 1 of 3: 3 of 9 heads
            (layer + "mlp.down_proj.weight", 1, 1024, 512),  # rank 2 of 3: 16 blocks a row
            (layer + "mlp.down_proj.weight", 1, 16, 48),  # off the block boundaries
            ("model.embed_tokens.weight", 0, 16384, 16384)]

    def same(a, b) -> bool:
        if isinstance(a, GgufTensor):
            return a.qtype == b.qtype and a.cols == b.cols and torch.equal(a.blocks, b.blocks)
        if hasattr(a, "dequantize"):
            a, b = a.dequantize(), b.dequantize()
        return torch.equal(a, b)

    for form in whole:
        for name, dim, start, n in cuts[:None if form == "float" else -1]:
            full = whole[form][name]
            if dim == 1 and start % 32 and form != "float":  # decoded whole rows, then cut
                want = whole["float"][name].narrow(dim, start, n)
            elif isinstance(full, GgufTensor):
                if dim == 1:
                    per = full.blocks.shape[1] * 32 // full.cols  # bytes per 32 columns
                    want = GgufTensor(full.qtype, full.blocks[:, start // 32 * per:
                                                                (start + n) // 32 * per], n)
                else:
                    want = full.permute_rows(lambda x: x.narrow(0, start, n))
            else:
                want = full.narrow(dim, start, n)
            assert same(lazy[form][name].narrow(dim, start, n), want), (form, name, dim, start)
    decoded = []
    real = gguf_file.dequantize
    monkeypatch.setattr(gguf_file, "dequantize",
                        lambda data, qtype: decoded.append(data.size) or real(data, qtype))
    lazy["float"][layer + "mlp.down_proj.weight"].narrow(1, 512, 512)
    assert decoded == [576 * 16 * 20]  # 576 rows of 16 Q4_1 blocks (20 bytes), not 48


# One tensor-parallel engine per process at a time: each class's engine ends with its class.
INT8 = dict(dtype="float32", quantization="int8")


@pytest.fixture(scope="module")
def llm_int8():
    """One rank, SmolLM2's GGUF in float32 with its weights quantized to int8 at load."""
    return LLM(MODEL, **INT8)


@pytest.fixture(scope="class")
def tp3():
    """3 ranks, each reading, decoding and quantizing only its part of the GGUF file, and every
    engine path at once: chunked prefill (16-token steps), a cache small enough to preempt, the
    prefix cache, async scheduling (the tokens fed from the device)."""
    llm = LLM(MODEL, tensor_parallel_size=3, distributed_timeout_s=TIMEOUT_S,
              max_num_batched_tokens=16, num_kv_blocks=12, async_scheduling=True, **INT8)
    yield llm
    llm.engine.shutdown()


class TestThreeRanks:
    def test_greedy_tokens_match_one_rank(self, llm_int8, tp3, prompts):
        llm = llm_int8
        model = tp3.engine.runner.model
        attn = model.layers[0].self_attn
        assert (attn.nh, attn.nkv) == (3, 1)  # this rank's share of 9 heads and 3 KV heads
        assert model.embed_tokens.weight.shape[0] == 49152 // 3
        o_proj = model.layers[0].self_attn.o_proj
        assert o_proj.method.name == "int8" and tuple(o_proj.weight.shape) == (576, 192)
        assert o_proj.weight.dtype == torch.int8
        shared = prompts[-1]  # the chat prompts share their template's prefix
        batch = prompts + [shared[:-2] + [11, 12]]
        want = [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)]
        first = tp3.generate(batch, GREEDY)
        again = tp3.generate(batch, GREEDY)  # the prompts' blocks are cached now
        assert [o.outputs[0].token_ids for o in first] == want
        assert [o.outputs[0].token_ids for o in again] == want
        assert tp3.engine.prefix_cache_stats.hits > 0
        assert tp3.engine.num_preemptions > 0

    def test_seeded_sampling_and_logprobs_match_one_rank(self, llm_int8, tp3, prompts):
        llm = llm_int8
        params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, logprobs=2)
        want = llm.generate(prompts[:3], params)
        got = tp3.generate(prompts[:3], params)
        for w, g in zip(want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert lg.logprob == pytest.approx(lw.logprob, abs=1e-3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gguf_path):
    folder = tmp_path_factory.mktemp("tp") / "tiny-llama"
    tiny_llama(folder, gguf_path)
    return str(folder)


@pytest.fixture(scope="class")
def tp2(tiny):
    llm = LLM(tiny, dtype="float32", tensor_parallel_size=2, distributed_timeout_s=TIMEOUT_S)
    yield llm
    llm.engine.shutdown()


class TestTwoRanksOneKVHead:
    def test_replicates_the_kv_head(self, tiny, tp2, prompts):
        attn = tp2.engine.runner.model.layers[0].self_attn
        assert (attn.nh, attn.nkv) == (2, 1)
        head = tp2.engine.runner.model.lm_head
        assert head.weight.shape[0] == 24578  # 49155 ids: 24578 a rank, the last row padding
        one = LLM(tiny, dtype="float32")
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
        want = one.generate(prompts[:4], params)
        got = tp2.generate(prompts[:4], params)
        for w, g in zip(want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            assert [lp.logprob for lp in g.outputs[0].logprobs] == pytest.approx(
                [lp.logprob for lp in w.outputs[0].logprobs], abs=1e-4)

    def test_killed_rank_stops_the_engine_with_an_error(self, tp2, prompts):
        """Runs last in its class: it kills tp2's rank 1."""
        worker = tp2.engine.ranks.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(5)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 .* killed by signal 9"):
            tp2.generate(prompts[:2], GREEDY)
        assert time.monotonic() - start < TIMEOUT_S
        with pytest.raises(RankFailure):  # and it stays down
            tp2.generate(prompts[:1], GREEDY)


# ---- ranks started by a launcher, as torchrun or a LeaderWorkerSet starts them --------------

@pytest.fixture(scope="module")
def tiny3(tmp_path_factory, gguf_path):
    """6 query heads, 3 KV heads, an MLP of 384: one KV head a rank over 3."""
    folder = tmp_path_factory.mktemp("tp3") / "tiny-llama-3"
    tiny_llama(folder, gguf_path, heads=6, kv=3, inter=384)
    return str(folder)


@pytest.fixture(scope="class")
def launched(tmp_path_factory, tiny3):
    """`tuili serve` started once per rank with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and
    LOCAL_RANK (one host here); rank 0 answers HTTP. The weights are quantized to int4 at load,
    each rank its own shard."""
    tmp = tmp_path_factory.mktemp("launched")
    port = _free_port()
    flags = ["serve", "--model", tiny3, "--tensor-parallel-size", "3", "--dtype", "float32",
             "--quantization", "int4",
             "--distributed-timeout-s", str(TIMEOUT_S), "--served-model-name", "tiny"]

    def env(rank: int) -> dict[str, str]:
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                "WORLD_SIZE": "3", "LOCAL_RANK": str(rank)}

    others = []
    for rank in (1, 2):
        log = (tmp / f"rank{rank}.log").open("w")
        others.append((subprocess.Popen(
            [sys.executable, "-m", "tuili", *flags, "--port", str(_free_port())],
            env={**os.environ, **env(rank), "PYTHONPATH": str(ROOT)}, stdout=log,
            stderr=subprocess.STDOUT), tmp / f"rank{rank}.log"))
    try:
        leader = TuiliProcess(tmp, flags, timeout=120, env=env(0))
    except Exception:
        for p, _ in others:
            p.kill()
        raise
    yield leader, others
    leader.stop()
    for p, _ in others:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestLaunchedRanks:
    def test_rank_zero_serves_the_same_tokens_as_one_process(self, launched, tiny3):
        leader, others = launched
        prompts = ["The capital of France is", "def add(a, b):"]
        one = LLM(tiny3, dtype="float32", quantization="int4")
        assert one.engine.runner.model.layers[0].mlp.down_proj.method.group == 128
        assert "float32 int4-g128 weights" in leader.log()
        want = one.generate(prompts, SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))
        for prompt, w in zip(prompts, want):
            r = httpx.post(f"{leader.url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == w.outputs[0].text
        assert all(p.poll() is None for p, _ in others)  # ranks 1, 2 serve steps, not HTTP

    def test_a_killed_rank_turns_health_and_requests_503(self, launched):
        """Runs last in its class: it kills rank 2."""
        leader, others = launched
        victim, _ = others[1]
        victim.kill()
        victim.wait(5)
        start = time.monotonic()
        r = httpx.post(f"{leader.url}/v1/completions", timeout=TIMEOUT_S + 10, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert time.monotonic() - start < TIMEOUT_S
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "engine_dead" and "tensor-parallel" in error["message"]
        assert httpx.get(f"{leader.url}/health").status_code == 503
        again = httpx.post(f"{leader.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
        rank1, log1 = others[0]
        assert rank1.wait(TIMEOUT_S) != 0  # the surviving rank stops too, saying why
        assert "rank 1 stops" in log1.read_text()
