"""The kernels' launch shapes as each GPU's traits choose them, checked without a GPU: an H100's
and an H200's properties as torch reports them, and the tiles the sweeps on each card picked."""

from types import SimpleNamespace

import pytest
import torch

from tuili.kernels import tuning

pytest.importorskip("triton")
from tuili.kernels import triton_attention, triton_gemv  # noqa: E402
from tuili.kernels.triton_gemv import GemvConfig  # noqa: E402

# torch.cuda.get_device_properties(0) on each card (memory clock in kHz, bus width in bits)
H100_PROPS = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132,
                             L2_cache_size=50 << 20, memory_clock_rate=2619000,
                             memory_bus_width=5120)
H200_PROPS = SimpleNamespace(name="NVIDIA H200", multi_processor_count=132,
                             L2_cache_size=60 << 20, memory_clock_rate=3201000,
                             memory_bus_width=6016)


def test_traits_from_properties():
    h100, h200 = (tuning.GpuTraits.from_properties(p) for p in (H100_PROPS, H200_PROPS))
    assert h100 == tuning.H100 and h200 == tuning.H200
    assert h100.peak_bandwidth == pytest.approx(3.35e12, rel=0.01)
    assert h200.peak_bandwidth == pytest.approx(4.81e12, rel=0.01)
    assert not h100.fast_memory and h200.fast_memory
    # a card without the memory fields is taken as an H100-class one, not guessed faster
    old = SimpleNamespace(name="x", multi_processor_count=108)
    assert tuning.GpuTraits.from_properties(old).peak_bandwidth == 0
    assert not tuning.GpuTraits.from_properties(old).fast_memory


def test_cpu_tensors_take_the_h100s_traits():
    assert tuning.gpu_traits(torch.device("cpu")) == tuning.H100


# (m, n, k, gated) of Llama-3.1-8B's layers -> (H100 tiles, H200 tiles; None: cuBLAS)
LLAMA_8B = {
    "qkv": ((1, 6144, 4096, False), GemvConfig(2, 4096, 8), GemvConfig(4, 4096, 8)),
    "o": ((1, 4096, 4096, False), GemvConfig(2, 4096, 8), GemvConfig(2, 4096, 8)),
    "gate_up": ((1, 14336, 4096, True), GemvConfig(2, 4096, 8),
                GemvConfig(64, 256, 4, 3, True)),
    "down": ((1, 4096, 14336, False), GemvConfig(4, 1024), GemvConfig(32, 512, 4, 3, True)),
    "lm_head": ((1, 128256, 4096, False), GemvConfig(2, 4096, 8),
                GemvConfig(64, 256, 4, 3, True)),
    "gate_up, 4 rows": ((4, 14336, 4096, True), GemvConfig(64, 256, 4, 3, True), None),
    "down, 4 rows": ((4, 4096, 14336, False), GemvConfig(32, 512, 4, 3, True), None),
    "o, 4 rows": ((4, 4096, 4096, False), GemvConfig(32, 512, 4, 3, True),
                  GemvConfig(64, 256, 4, 4, True)),
}


@pytest.mark.parametrize("layer", LLAMA_8B)
def test_gemv_tiles_by_card(layer):
    (m, n, k, gated), h100, h200 = LLAMA_8B[layer]
    assert triton_gemv.default_config(m, n, k, gated=gated, gpu=tuning.H100) == h100
    assert triton_gemv.default_config(m, n, k, gated=gated, gpu=tuning.H200) == h200


def test_qwen_square_projection_avoids_a_part_masked_tile():
    # Qwen2.5-7B's o: 3584 columns would leave an eighth of a 4096-wide tile masked
    assert (triton_gemv.default_config(1, 3584, 3584, gpu=tuning.H200)
            == GemvConfig(4, 2048))


def test_decode_attention_steps_by_card(monkeypatch):
    cpu = torch.device("cpu")
    assert triton_attention.decode_config(1, 8, 128, cpu) == triton_attention.DecodeConfig(32, 64)
    monkeypatch.setattr(triton_attention, "gpu_traits", lambda device=None: tuning.H200)
    assert triton_attention.decode_config(1, 8, 128, cpu) == triton_attention.DecodeConfig(32, 128)
    # a batch that fills the SMs alone is not split and keeps 64-key steps
    assert triton_attention.decode_config(16, 8, 128, cpu).block_n == 64
