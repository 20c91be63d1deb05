"""Quantized weights: a format is a QuantConfig (config.py) and one Linear method class (fp8.py,
int8.py, int4.py: GPTQ, AWQ, int4 at load). `prepare` puts the methods on a built model's
Linear layers before its weights load; the model code knows nothing of them."""

from __future__ import annotations

from torch import nn

from tuili.errors import InvalidParameter
from tuili.kernels import HAS_TRITON
from tuili.layers.linear import Linear
from tuili.quantization.config import QuantConfig, resolve
from tuili.quantization.fp8 import Fp8Method
from tuili.quantization.int4 import AwqMethod, GptqMethod, Int4AtLoadMethod
from tuili.quantization.int8 import Int8Method

__all__ = ["QuantConfig", "prepare", "resolve", "weight_format"]
# A load's quantization label -> the bytes per weight the analysis counts (analysis/ops.py).
WEIGHT_FORMATS = {"fp8": "fp8", "int8": "int8", "gptq": "int4", "awq": "int4", "int4-g128": "int4"}


def weight_format(label: str) -> str | None:
    """The layers' stored format for the profiler's MBU (None: the dtype's, or GGUF int4's)."""
    return WEIGHT_FORMATS.get(label)


def method_class(qc: QuantConfig):
    if qc.method == "int4":
        return Int4AtLoadMethod
    return {"gptq": GptqMethod, "awq": AwqMethod, "fp8": Fp8Method, "int8": Int8Method}[qc.method]


def prepare(model: nn.Module, qc: QuantConfig) -> list[str]:
    """Give each covered Linear of `model` its quantized method and checkpoint-shaped parameters;
    returns the names of the layers quantized."""
    merged = getattr(model, "MERGED", {})
    done = []
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        owner, _, leaf = name.rpartition(".")
        parts = [f"{owner}.{k}" for k, (m, _) in merged.items() if m == leaf] or [name]
        if not qc.covers(parts, is_lm_head=name == "lm_head"):
            continue
        layer.params_dtype, layer.params_device = layer.weight.dtype, layer.weight.device
        try:
            layer.method = method_class(qc)(qc, layer)
        except InvalidParameter as e:  # a shard that does not fit the format: name the layer
            raise InvalidParameter(e.param, f"{name}: {str(e).removeprefix(e.param + ': ')}") \
                from None
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        layer.method.use_triton = layer.params_device.type == "cuda" and HAS_TRITON
        layer.method.create_weights(layer)
        done.append(name)
    return done
