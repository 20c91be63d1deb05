"""granite-4.0-h (GraniteMoeHybridForCausalLM) against HF transformers: tiny random-weight models
(Mamba-2 mixer layers around an attention layer; one dense and rope-less, one with experts and
rotary) saved as HF folders. Greedy tokens one by one and batched, with the prompt split over
steps (chunked prefill, mixed steps), under preemption, with the state slots fewer than the
sequences asked for, and on prefix-cache hits (states restored from snapshots); the state slots
come back after each run; `tuili analyze` on the folder."""

import pytest
import torch

from tests.gpu.random_models import byte_tokenizer
from tuili import LLM, SamplingParams
from tuili.engine.state_cache import state_bytes_per_seq

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=32, shared_intermediate_size=48,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
              mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8, num_experts_per_tok=2,
              embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
              logits_scaling=3.0, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
              max_position_embeddings=512)
VARIANTS = {"dense-nope": dict(num_local_experts=0, position_embedding_type="nope"),
            "experts-rope": dict(num_local_experts=4, position_embedding_type="rope")}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# 30 tokens: the mixers' scan crosses chunks of 8; the 19-token prompt shares a 16-token prefix
LENGTHS = (1, 7, 30)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


@torch.inference_mode()
def hf_greedy(model, ids, n=GREEDY.max_tokens):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (folder, HF model, HF's greedy tokens of prompts()), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            config = transformers.GraniteMoeHybridConfig(**COMMON, **VARIANTS[name])
            model = transformers.GraniteMoeHybridForCausalLM(config).eval()
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            byte_tokenizer().save(str(folder / "tokenizer.json"))
            cache[name] = folder, model, [hf_greedy(model, p) for p in prompts()]
        return cache[name]
    return get


@pytest.fixture(params=list(VARIANTS))
def variant(request, built):
    return built(request.param)


@pytest.fixture
def hybrid(built):
    """The variant with experts and rotary: the engine tests below run on it alone (CI time)."""
    return built("experts-rope")


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_slots_back(llm: LLM) -> None:
    states = llm.engine.kv.states
    assert not states.owner and len(states.free) == states.num_slots


def test_greedy_matches_hf(variant):
    folder, model, expected = variant
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64)
    assert llm.engine.model_config.mamba.layers == [0, 2, 3]
    assert [tokens(llm.generate([p], GREEDY))[0] for p in prompts()] == expected
    assert tokens(llm.generate(prompts(), GREEDY)) == expected
    assert_slots_back(llm)


def test_chunked_prefill_and_mixed_steps(hybrid):
    """A 5-token budget splits the 30-token prompt over 6 steps (the states carried across them)
    and puts decodes and prefill chunks in one step; each step planned before the last one's
    tokens are read back (asynchronous scheduling, as on the GPU)."""
    folder, _, expected = hybrid
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64,
              max_num_batched_tokens=5, enable_chunked_prefill=True, async_scheduling=True)
    assert llm.engine.async_scheduling
    assert tokens(llm.generate(prompts(), GREEDY)) == expected
    assert_slots_back(llm)


def test_preemption_recomputes_the_state(hybrid):
    """Eight blocks of 4 tokens cannot hold all three sequences (42 tokens the longest): the
    latest is preempted, its slot given back, and recomputed from its prompt later."""
    folder, _, expected = hybrid
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=14)
    assert tokens(llm.generate(prompts(), GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_slots_back(llm)


def test_fewer_state_slots_than_sequences(hybrid):
    """A cache budget whose half holds two sequences' states and their snapshots: max_num_seqs
    drops to 2 and the third prompt waits for a slot."""
    folder, _, expected = hybrid
    probe = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64)
    slot = state_bytes_per_seq(probe.engine.runner.model, torch.float32)
    del probe
    llm = LLM(str(folder), dtype="float32", block_size=8, kv_cache_memory_gb=9 * slot / 2**30)
    assert llm.engine.config.max_num_seqs == 2 and llm.engine.kv.states.num_slots == 2
    assert tokens(llm.generate(prompts(), GREEDY)) == expected
    assert_slots_back(llm)


@pytest.mark.parametrize("budget", [None, 8])
def test_prefix_hits_restore_the_snapshotted_states(hybrid, budget):
    """A prompt's states are snapshotted at its last block boundary (24 of 30 tokens; with a
    8-token budget at the end of the chunk 16..24). The same prompt again, and the prompt
    extended by its answer, hit 24 tokens and start from the snapshot; a prompt sharing only 16
    tokens has no snapshot at its end of the match and runs cold. All give HF's tokens."""
    folder, model, expected = hybrid
    options = {"max_num_batched_tokens": budget, "enable_chunked_prefill": True} if budget else {}
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64, **options)
    stats = llm.engine.pool.stats
    longest = prompts()[2]
    assert tokens(llm.generate([longest], GREEDY)) == [expected[2]]
    assert stats.hits == 0
    assert tokens(llm.generate([longest], GREEDY)) == [expected[2]]
    assert stats.hits == 24
    turn = longest + expected[2][:5] + [9, 10]
    shared = longest[:16] + [5, 6, 7, 8, 9]
    assert tokens(llm.generate([turn, shared], GREEDY)) == [hf_greedy(model, turn),
                                                           hf_greedy(model, shared)]
    assert stats.hits == 48
    assert_slots_back(llm)


def test_prefix_caching_off_for_a_hybrid_runs_cold(hybrid):
    folder, _, expected = hybrid
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64,
              enable_prefix_caching=False)
    assert llm.engine.kv.states.num_snapshots == 0
    for _ in range(2):
        assert tokens(llm.generate(prompts()[2:], GREEDY)) == expected[2:]
    assert llm.engine.pool.stats.hits == 0


def test_abort_gives_the_slot_back(hybrid):
    folder, _, _ = hybrid
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("a", prompts()[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv.states.owner
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert_slots_back(llm)


def test_analyze_knows_the_mixer_layers(built):
    """`tuili analyze` on the dense folder: parameters as HF counts them (norms aside), K/V for
    the one attention layer only, a fixed state per sequence equal to the engine's slot, decode
    bytes of the mixers flat in context, and the planner's batches counting the states."""
    from tuili.analysis import ops
    from tuili.analysis.measure import get_device
    from tuili.analysis.memory import kv_bytes_read, plan
    from tuili.analysis.report import analyze, format_report
    from tuili.analysis.shapes import model_config

    folder, model, _ = built("dense-nope")
    c, _ = model_config(str(folder))
    assert c.mamba.layers == [0, 2, 3] and c.num_attention_layers == 1
    hf_params = sum(p.numel() for n, p in model.named_parameters() if "layernorm" not in n
                    and n != "model.norm.weight")
    counted = ops.num_params(c)
    assert counted["layers"] + counted["tables"] == hf_params
    fp32 = ops.Precision.for_dtype("fp32")
    llm = LLM(str(folder), dtype="float32", block_size=8, num_kv_blocks=8)
    state = state_bytes_per_seq(llm.engine.runner.model, torch.float32)
    memory = plan(c, fp32, 2**30)
    assert memory.state_bytes_per_seq == state
    assert memory.kv_bytes_per_token == 2 * 2 * 16 * 4  # one layer's K and V, 2 heads of 16
    assert memory.max_batch(512) == int(memory.kv_budget_bytes // (512 * 256 + state))
    assert kv_bytes_read(c, 400, "fp32") == 400 * 256
    short, long = (ops.decode_ops(c, 4, ctx, fp32) for ctx in (64, 512))
    mixer = [next(o for o in step if o.name == "mixer") for step in (short, long)]
    assert mixer[0].bytes == mixer[1].bytes and mixer[0].bytes > 4 * 2 * state
    attention = [next(o for o in step if o.name == "attention") for step in (short, long)]
    assert attention[1].bytes > attention[0].bytes
    report = format_report(analyze(c, get_device("h200"), fp32, prompt=100))
    assert "recurrent state: 3 of 4 layers are Mamba-2 mixers" in report


def test_speculative_decoding_is_refused(hybrid):
    """A rejected draft's K/V rolls back; a recurrent state cannot: a clear error, not wrong
    tokens."""
    from tuili.errors import InvalidParameter

    folder, _, _ = hybrid
    with pytest.raises(InvalidParameter, match="speculative_config"):
        LLM(str(folder), dtype="float32", num_kv_blocks=16,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2})
