"""The kernels' launch shapes as each GPU's traits choose them, checked without a GPU: an H100's
and an H200's properties as torch reports them, and the tiles the sweeps on each card picked."""

from types import SimpleNamespace

import pytest
import torch

from tuili.kernels import tuning

pytest.importorskip("triton")
from tuili.kernels import triton_gemv  # noqa: E402
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


# (m, n, k, gated) of a layer -> (H100 tiles, H200 tiles; None: cuBLAS and separate kernels)
LAYERS = {
    "8B qkv": ((1, 6144, 4096, False), GemvConfig(2, 4096, 8),
               GemvConfig(32, 512, 4, 3, True, early_release=True)),
    "8B o": ((1, 4096, 4096, False), GemvConfig(2, 4096, 8), GemvConfig(4, 2048, 8)),
    "8B gate_up": ((1, 14336, 4096, True), GemvConfig(2, 4096, 8), None),
    "8B down": ((1, 4096, 14336, False), GemvConfig(4, 1024), GemvConfig(4, 1024)),
    "8B LM head": ((1, 128256, 4096, False), GemvConfig(2, 4096, 8),
                   GemvConfig(64, 256, 4, 3, True)),
    "Qwen2.5-7B o": ((1, 3584, 3584, False), GemvConfig(2, 4096, 8), None),
    "8B gate_up, 4 rows": ((4, 14336, 4096, True), GemvConfig(64, 256, 4, 3, True),
                           GemvConfig(64, 256, 4, 3, True)),
    "SmolLM2 down": ((1, 576, 1536, False), GemvConfig(2, 1024), GemvConfig(1, 2048)),
    "SmolLM2 down, 2 rows": ((2, 576, 1536, False), GemvConfig(2, 1024), GemvConfig(1, 2048)),
    "SmolLM2 gate_up": ((1, 1536, 576, True), GemvConfig(1, 1024), GemvConfig(1, 1024)),
    "SmolLM2 LM head": ((1, 49152, 576, False), None, None),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_gemv_tiles_by_card(layer):
    (m, n, k, gated), h100, h200 = LAYERS[layer]
    assert triton_gemv.default_config(m, n, k, gated=gated, gpu=tuning.H100) == h100
    assert triton_gemv.default_config(m, n, k, gated=gated, gpu=tuning.H200) == h200


def test_tune_as_names_a_card(monkeypatch):
    monkeypatch.setenv("TUILI_TUNE_AS", "h200")
    tuning._cuda_traits.cache_clear()
    try:
        assert tuning._cuda_traits(0) == tuning.H200
        monkeypatch.setenv("TUILI_TUNE_AS", "a100")
        tuning._cuda_traits.cache_clear()
        with pytest.raises(ValueError, match="TUILI_TUNE_AS"):
            tuning._cuda_traits(0)
    finally:
        tuning._cuda_traits.cache_clear()
