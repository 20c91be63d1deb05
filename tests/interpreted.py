"""What each module of Triton kernel tests under the interpreter does before importing them."""

import importlib.util
import os
import sys

import pytest
import torch

# Triton 3.6's interpreter reads scalars out of 1-element arrays (NumPy < 2.4 allows it).
IGNORE_SCALAR_READS = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def use_interpreter(kernel_module: str) -> None:
    """Skip the calling module where its kernels cannot run interpreted (no Triton; a GPU, where
    tests/gpu runs them compiled; `kernel_module` already imported compiled), else set
    TRITON_INTERPRET=1, which Triton reads as each kernel module is imported after this call."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed", allow_module_level=True)
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine tests/gpu runs the kernels compiled", allow_module_level=True)
    if kernel_module in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels were imported compiled", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
