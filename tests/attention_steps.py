"""A mixed step's attention metadata shared by the interpreted model-step tests: two decodes
and a chunk of 3 new tokens after 4 cached ones, over 8 blocks of 4 tokens."""

import torch

from tuili.layers.attention import AttentionMetadata


def mixed_step_meta(rope) -> AttentionMetadata:
    lens = torch.tensor([5, 9, 7])
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    positions = torch.tensor([4, 8, 4, 5, 6])
    rows = torch.tensor([0, 1, 2, 2, 2])
    slots = tables[rows, positions // 4] * 4 + positions % 4
    return AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens,
                             positions=positions, rope=rope, num_decodes=2, max_decode_len=9,
                             prefills=[(2, 3, 4)],
                             prefill_seqs=torch.tensor([[2], [3], [4]], dtype=torch.int32))


def random_llamas(config):
    """(a Llama of `config` on the torch backend, the same weights on the Triton one, CPU
    tensors: under the interpreter), random weights, the norms' around 1."""
    import tuili.layers.backend as backend
    import tuili.models.llama as llama

    model = llama.LlamaForCausalLM(config)
    gpu_model = llama.LlamaForCausalLM(config, backend.TritonBackend(torch.device("cpu")))
    for p in model.parameters():
        p.data.normal_(0, 0.08)
    for m in model.modules():
        if isinstance(m, llama.RMSNorm):
            m.weight.data.uniform_(0.5, 1.5)
    gpu_model.load_state_dict(model.state_dict())
    return model, gpu_model
