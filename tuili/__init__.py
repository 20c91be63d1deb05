"""tuili (推理): an LLM inference and serving engine."""

import logging
import os

from tuili.config import EngineConfig
from tuili.errors import InvalidParameter, ModelLoadError, PromptTooLong, TuiliError
from tuili.outputs import CompletionOutput, RequestOutput
from tuili.pooling_params import PoolingParams
from tuili.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "TuiliError", "InvalidParameter", "ModelLoadError", "PromptTooLong",
           "PoolingParams"]

_log = logging.getLogger("tuili")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s tuili: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(os.environ.get("TUILI_LOG_LEVEL", "INFO").upper())
    _log.propagate = False


def __getattr__(name: str):
    # The engines import torch: loaded on first use, so that torch-free parts (the router, the
    # CLI's help) start quickly.
    if name in ("LLM", "AsyncLLM"):
        from tuili import entry

        return getattr(entry, name)
    raise AttributeError(f"module 'tuili' has no attribute {name!r}")
