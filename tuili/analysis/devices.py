"""Device ceilings: peak dense matmul rate per compute dtype, memory bandwidth and capacity.

Spec-sheet numbers are dense (no 2:4 sparsity) tensor-core peaks. Sources, read 2026-11-22:
NVIDIA's H100/H200/A100/L4 datasheets as tabulated at glennklockwood.com/garden/processors/h100 and
/A100, ai-hpc.github.io (H200 HBM3e 4.8 TB/s), thundercompute.com (A100 80GB SXM 2,039 GB/s),
yobitel.com (L4: 121 TFLOPS BF16, 242 FP8, 485 TOPS INT8 with sparsity so 242 dense, 300 GB/s),
waredb.com (RTX 4090: 165 TFLOPS BF16 with FP32 accumulate, 330 FP8, 660 TOPS INT8, 1,008 GB/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field


GB = 1e9


@dataclass
class Device:
    """One accelerator's ceilings. `flops` maps a compute dtype to its peak FLOP/s."""
    name: str
    bandwidth: float  # bytes/s
    flops: dict[str, float]
    memory_bytes: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype; a dtype without its own units runs at bf16's rate."""
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype == "fp16":
            return self.flops["bf16"]
        return self.flops["bf16"] if dtype in ("fp8", "int8") else self.flops.get("fp32", self.flops["bf16"])

    def ridge(self, dtype: str = "bf16") -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.peak_flops(dtype) / self.bandwidth


# A100 has no FP8 units (FP8 runs at BF16's rate there); INT4 tensor cores are not listed as
# nobody's LLM kernels use them: int4 weights are dequantized and multiplied in bf16.
DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM5 80GB", 3.35e12,
                   {"bf16": 989.4e12, "fp8": 1978.9e12, "int8": 1978.9e12, "fp32": 494.7e12},
                   80 * GB),
    "h200": Device("H200 SXM 141GB", 4.8e12,
                   {"bf16": 989.4e12, "fp8": 1978.9e12, "int8": 1978.9e12, "fp32": 494.7e12},
                   141 * GB),
    "a100": Device("A100 SXM4 80GB", 2.039e12,
                   {"bf16": 312e12, "int8": 624e12, "fp32": 156e12}, 80 * GB),
    "rtx4090": Device("GeForce RTX 4090", 1.008e12,
                      {"bf16": 165.2e12, "fp8": 330.3e12, "int8": 660.6e12, "fp32": 82.6e12},
                      24 * GB, note="bf16/fp16 with fp32 accumulate; 330 TFLOPS with fp16 accumulate"),
    "l4": Device("L4 24GB", 0.3e12,
                 {"bf16": 121e12, "fp8": 242e12, "int8": 242e12, "fp32": 60e12}, 24 * GB),
    # A modest server CPU socket; `--device measure` replaces this with numbers taken here.
    "cpu": Device("CPU (nominal)", 25e9, {"bf16": 1e12, "fp32": 0.5e12}, 16 * GB,
                  note="a rough default; use --device measure for this machine"),
}
