"""Random-weight EAGLE-1/2 and EAGLE-3 head checkpoints in the public layouts, for a target of a
given HF config (the CPU tests' SmolLM2, the GPU tests' and benchmarks' Llama-3.1-8B shape),
a one-request run of an engine, and the states an EAGLE head read against a prefill's."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_head(folder: Path, target: dict, eagle3: bool, fmt: str = "safetensors",
              draft_vocab: int | None = None, seed: int = 0, drop: tuple[str, ...] = (),
              **config) -> Path:
    """A head for `target` (its config.json as a dict) in `folder`: EAGLE-1's fc over 2 x hidden
    and layers.0.* without an input norm, or EAGLE-3's fc over 3 x hidden, midlayer.*, norm,
    lm_head over `draft_vocab` tokens and d2t. `drop`: tensors left out; `config`: overrides."""
    g = torch.Generator().manual_seed(seed)
    d, inter = target["hidden_size"], target["intermediate_size"]
    heads = target["num_attention_heads"]
    kv = target.get("num_key_value_heads") or heads
    hd = target.get("head_dim") or d // heads
    vocab = target["vocab_size"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    layer = "midlayer" if eagle3 else "layers.0"
    qkv_in = 2 * d if eagle3 else d
    t = {"fc.weight": w(d, (3 if eagle3 else 2) * d),
         f"{layer}.self_attn.q_proj.weight": w(heads * hd, qkv_in),
         f"{layer}.self_attn.k_proj.weight": w(kv * hd, qkv_in),
         f"{layer}.self_attn.v_proj.weight": w(kv * hd, qkv_in),
         f"{layer}.self_attn.o_proj.weight": w(d, heads * hd),
         f"{layer}.mlp.gate_proj.weight": w(inter, d),
         f"{layer}.mlp.up_proj.weight": w(inter, d),
         f"{layer}.mlp.down_proj.weight": w(d, inter),
         f"{layer}.post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}
    if eagle3:
        n = draft_vocab or vocab
        ids = torch.randperm(vocab, generator=g)[:n].sort().values
        t.update({f"{layer}.input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                  f"{layer}.hidden_norm.weight": torch.ones(d, dtype=torch.bfloat16),
                  "norm.weight": torch.ones(d, dtype=torch.bfloat16),
                  "lm_head.weight": w(n, d), "d2t": ids - torch.arange(n),
                  "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)})
    for name in drop:
        t.pop(name)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: target[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "rms_norm_eps", "rope_theta",
                                  "max_position_embeddings", "vocab_size") if k in target}
    if target.get("rope_scaling"):
        cfg["rope_scaling"] = target["rope_scaling"]
    cfg.update(architectures=["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"],
               num_hidden_layers=1, **({"draft_vocab_size": draft_vocab or vocab} if eagle3 else {}))
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(t, folder / "model.safetensors")
    else:
        torch.save(t, folder / "pytorch_model.bin")
    return folder


def run_alone(engine, rid: str, prompt: list[int], params) -> list[int]:
    """The tokens of one request run to its end by the engine's own steps (named `rid`)."""
    engine.add_request(rid, prompt, params, stream=False)
    out = []
    while engine.has_unfinished_requests():
        out += [o.outputs[0].token_ids for o in engine.step() if o.request_id == rid]
    return out[-1]


def states_read_and_computed(engine, monkeypatch, prompt: list[int], params
                             ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run `prompt` alone, then prompt + its output as one prefill (prefix cache reset before
    each): ({position: the state the head read for that real entry} of the first run,
    {position: the target's state} of the prefill), in float32."""
    from tuili import SamplingParams
    from tuili.engine.spec_decode.eagle import EagleSeq

    read, computed = {}, {}
    inputs, observe = EagleSeq.inputs, EagleSeq.observe

    def spy_inputs(self, start, n, like):
        out = inputs(self, start, n, like)
        if self.request_id == "read" and start < self.num_real:
            read.update({start + j: out[j].float() for j in range(n)})
        return out

    def spy_observe(self, start, states):
        if self.request_id == "full":
            computed.update({start + j: states[j].float() for j in range(len(states))})
        observe(self, start, states)

    monkeypatch.setattr(EagleSeq, "inputs", spy_inputs)
    monkeypatch.setattr(EagleSeq, "observe", spy_observe)
    engine.pool.reset_prefix_cache()
    out = run_alone(engine, "read", prompt, params)
    engine.pool.reset_prefix_cache()
    run_alone(engine, "full", prompt + out, SamplingParams(temperature=0, max_tokens=1))
    return read, computed
