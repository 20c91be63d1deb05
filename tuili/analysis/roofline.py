"""The roofline: each operator's intensity against the device's ridge, its lower-bound time, the
phase floors (TTFT, time per output token) and a decode batch sweep."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tuili.analysis import ops as opsmod
from tuili.analysis.devices import Device
from tuili.models.config import ModelConfig


def bound_time(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """Seconds an operator needs at least: whichever of its math and its traffic takes longer."""
    return max(flops / peak_flops, nbytes / bandwidth)


@dataclass
class OpRoofline:
    """One operator placed on a device's roofline."""
    phase: str
    name: str
    flops: float
    bytes: float
    intensity: float
    ridge: float
    bound: str  # "memory" or "compute"
    time_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def place(op: opsmod.Op, device: Device, phase: str) -> OpRoofline:
    peak = device.peak_flops(op.compute_dtype)
    ridge = peak / device.bandwidth
    bound = "compute" if op.intensity >= ridge else "memory"
    return OpRoofline(phase, op.name, op.flops, op.bytes, op.intensity, ridge, bound,
                      bound_time(op.flops, op.bytes, peak, device.bandwidth))


def place_all(ops: list[opsmod.Op], device: Device, phase: str) -> list[OpRoofline]:
    return [place(op, device, phase) for op in ops]


@dataclass
class PhaseTotals:
    flops: float
    bytes: float
    time_s: float  # sum of the operators' lower bounds: the phase's floor

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


def totals(placed: list[OpRoofline]) -> PhaseTotals:
    return PhaseTotals(sum(p.flops for p in placed), sum(p.bytes for p in placed),
                       sum(p.time_s for p in placed))


@dataclass
class SweepRow:
    """Decode at one batch size: floors, throughput, and which ceiling binds."""
    batch: int
    tpot_s: float
    tokens_per_s: float
    intensity: float  # the whole step
    linear_intensity: float  # the weight-bearing operators (QKV, O, MLP)
    linears_bound: str
    step_bound: str
    fits_memory: bool

    def as_dict(self) -> dict:
        return asdict(self)


def decode_sweep(c: ModelConfig, device: Device, context: int, precision: opsmod.Precision,
                 batches: list[int], max_batch_in_memory: int | None = None) -> list[SweepRow]:
    """Decode floors over batch sizes at a fixed context length."""
    rows = []
    for b in batches:
        placed = place_all(opsmod.decode_ops(c, b, context, precision), device, "decode")
        tot = totals(placed)
        linears = [p for p in placed if p.name in ("qkv_proj", "o_proj", "mixer_proj", "mlp")]
        lin_flops, lin_bytes = sum(p.flops for p in linears), sum(p.bytes for p in linears)
        ridge = device.ridge(opsmod.compute_dtype(precision.weights))
        lin_i = lin_flops / lin_bytes
        rows.append(SweepRow(
            b, tot.time_s, b / tot.time_s, tot.intensity, lin_i,
            "compute" if lin_i >= ridge else "memory",
            "compute" if tot.intensity >= ridge else "memory",
            max_batch_in_memory is None or b <= max_batch_in_memory))
    return rows


def first_compute_bound(rows: list[SweepRow], which: str = "linears") -> int | None:
    """The smallest batch at which the linears (or the whole step) turn compute-bound."""
    for r in rows:
        if (r.linears_bound if which == "linears" else r.step_bound) == "compute":
            return r.batch
    return None


def decode_crossover(c: ModelConfig, device: Device, context: int, precision: opsmod.Precision,
                     which: str = "linears", limit: int = 1 << 20) -> int | None:
    """The smallest decode batch whose linears (or whole step) are compute-bound; None if even
    `limit` is not (intensity only rises with batch, so a bisection finds it)."""
    def compute_bound(b: int) -> bool:
        row = decode_sweep(c, device, context, precision, [b])[0]
        return (row.linears_bound if which == "linears" else row.step_bound) == "compute"

    if not compute_bound(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if compute_bound(mid) else (mid + 1, hi)
    return lo
