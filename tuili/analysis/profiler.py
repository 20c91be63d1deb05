"""The engine's phase profiler: each step's time, with its bytes and FLOPs estimated from the ops
model, summed per phase into achieved bandwidth (MBU) and FLOP/s (MFU) against the device.

A step is a prefill step (no decode rows), a decode step (only decode rows) or a mixed one
(both, as chunked prefill schedules them); each kind is its own phase. A step's time is the wall
time of its engine.step() call; with async scheduling that call mostly waits for the step before,
so where the phase changes one step's time lands in its neighbour's phase.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tuili.analysis import ops as opsmod
from tuili.analysis import roofline
from tuili.analysis.devices import Device
from tuili.models.config import ModelConfig

PHASES = ("prefill", "decode", "mixed")
TORCH_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


@dataclass
class PhaseStats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    floor_s: float = 0.0  # the roofline's lower bound for the same steps


class PhaseProfiler:
    """Call record(...) once per step; read summary(), snapshot() or format()."""

    def __init__(self, config: ModelConfig, device: Device, precision: opsmod.Precision,
                 small_step_precision: opsmod.Precision | None = None, small_step_tokens: int = 0,
                 small_head: str | None = None, small_head_rows: int = 0):
        self.config, self.device, self.precision = config, device, precision
        # Steps of at most small_step_tokens tokens may read other weights (tuili's packed int4),
        # and of at most small_head_rows sampled rows another LM head (its int8 copy).
        self.small_precision = small_step_precision or precision
        self.small_tokens = small_step_tokens
        self.small_head, self.small_head_rows = small_head, small_head_rows
        self.phases = {p: PhaseStats() for p in PHASES}

    @classmethod
    def for_run(cls, config: ModelConfig, dtype: str, device, int4_rows: int = 0,
                weights: str | None = None, small_weights: str = "int4-g32",
                kv: str | None = None, int8_head_rows: int = 0) -> PhaseProfiler:
        """A profiler for a running engine: its model shape, dtype ("torch.bfloat16") and torch
        device; int4_rows: steps of up to so many tokens read the layers as small_weights
        (tuili's packed int4 on CPU by default; 0: none); weights: the layers' format in other
        steps (ops.WEIGHT_BITS), the head staying dtype; kv: the KV cache's format ("fp8";
        default dtype's); int8_head_rows: steps sampling up to so many rows read the LM head's
        int8 copy (quantization/int8.py Int8HeadMethod; 0: none)."""
        from tuili.analysis.measure import for_torch_device

        precision = opsmod.Precision.for_dtype(TORCH_DTYPES[dtype], kv)
        if weights:
            precision = opsmod.Precision(weights, precision.head, precision.kv,
                                         precision.activations)
        small = None
        if int4_rows:
            small = opsmod.Precision(small_weights, precision.head, precision.kv, precision.activations)
        return cls(config, for_torch_device(device), precision, small, int4_rows,
                   "int8" if int8_head_rows else None, int8_head_rows)

    def record(self, seqs: list[tuple[int, int]], sampled: int, num_decodes: int,
               seconds: float) -> None:
        """One step: (new_tokens, context) per sequence, rows through the LM head, its seconds."""
        tokens = sum(n for n, _ in seqs)
        precision = self.small_precision if tokens <= self.small_tokens else self.precision
        if self.small_head is not None and sampled <= self.small_head_rows:
            precision = replace(precision, lm_head=self.small_head)
        placed = roofline.place_all(opsmod.step_ops(self.config, seqs, sampled, precision),
                                    self.device, "step")
        phase = "prefill" if num_decodes == 0 else "decode" if num_decodes == len(seqs) else "mixed"
        s = self.phases[phase]
        s.steps += 1
        s.tokens += tokens
        s.seconds += seconds
        s.flops += sum(p.flops for p in placed)
        s.bytes += sum(p.bytes for p in placed)
        s.floor_s += sum(p.time_s for p in placed)

    def reset(self) -> None:
        self.phases = {p: PhaseStats() for p in PHASES}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per phase with steps: totals, achieved rates, MBU and MFU (fractions of the ceilings),
        and floor_ratio (the roofline's lower bound / the time taken)."""
        peak = self.device.peak_flops(opsmod.compute_dtype(self.precision.weights))
        out = {}
        for name, s in self.phases.items():
            if not s.steps:
                continue
            bw = s.bytes / s.seconds if s.seconds else 0.0
            fl = s.flops / s.seconds if s.seconds else 0.0
            out[name] = {
                "steps": s.steps, "tokens": s.tokens, "seconds": s.seconds,
                "tokens_per_s": s.tokens / s.seconds if s.seconds else 0.0,
                "bytes": s.bytes, "flops": s.flops,
                "bandwidth_bytes_per_s": bw, "flops_per_s": fl,
                "mbu": bw / self.device.bandwidth, "mfu": fl / peak,
                "floor_s": s.floor_s, "floor_ratio": s.floor_s / s.seconds if s.seconds else 0.0,
            }
        return out

    def snapshot(self) -> dict[str, float]:
        """Flat, Prometheus-style names (tuili_profile_<phase>_<field>) for a /metrics endpoint."""
        return {f"tuili_profile_{phase}_{key}": float(value)
                for phase, stats in self.summary().items() for key, value in stats.items()}

    def format(self) -> str:
        """A table of the summary, with the ceilings it was measured against."""
        from tuili.analysis.report import format_table

        rows = [[phase, s["steps"], s["tokens"], f"{s['seconds']:.3f}", f"{s['tokens_per_s']:.1f}",
                 f"{s['bandwidth_bytes_per_s'] / 1e9:.2f}", f"{100 * s['mbu']:.1f}%",
                 f"{s['flops_per_s'] / 1e9:.1f}", f"{100 * s['mfu']:.2f}%",
                 f"{100 * s['floor_ratio']:.1f}%"]
                for phase, s in self.summary().items()]
        d = self.device
        head = (f"profile against {d.name}: {d.bandwidth / 1e9:.1f} GB/s, "
                f"{d.peak_flops(opsmod.compute_dtype(self.precision.weights)) / 1e12:.2f} TFLOP/s "
                f"({self.precision.weights})")
        return head + "\n" + format_table(
            ["phase", "steps", "tokens", "time s", "tok/s", "GB/s", "MBU", "GFLOP/s", "MFU",
             "floor/time"], rows)
