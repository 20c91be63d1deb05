"""GGUF block types as planes, and their plain-torch dequantization (the CPU path and the oracle
of kernels/triton_gguf.py, itself checked against the gguf package's dequantizer).

A tensor's blocks are split once, at load, into one plane per field (quants, high bits, scales,
d, min), each [rows, ...] row-major. The bytes are the file's, unchanged and as many; only their
interleaving goes: a Q4_0 block is 18 bytes and a Q6_K block 210, so in the file's layout a row's
quants sit at 2-byte alignment and a kernel reads them a byte at a time; in planes every row of
every plane starts 16-byte aligned and a warp's loads are wide and coalesced."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256
# type -> (values per block, bytes per block, {plane: (first byte, end byte)}); d/m are float16.
LAYOUTS = {
    "Q8_0": (32, 34, {"d": (0, 2), "qs": (2, 34)}),
    "Q4_0": (32, 18, {"d": (0, 2), "qs": (2, 18)}),
    "Q4_1": (32, 20, {"d": (0, 2), "m": (2, 4), "qs": (4, 20)}),
    "Q4_K": (QK_K, 144, {"d": (0, 2), "m": (2, 4), "scales": (4, 16), "qs": (16, 144)}),
    "Q5_K": (QK_K, 176, {"d": (0, 2), "m": (2, 4), "scales": (4, 16), "qh": (16, 48),
                         "qs": (48, 176)}),
    "Q6_K": (QK_K, 210, {"qs": (0, 128), "qh": (128, 192), "scales": (192, 208), "d": (208, 210)}),
}
TYPES = tuple(LAYOUTS)


def bits_per_weight(qtype: str) -> float:
    values, nbytes, _ = LAYOUTS[qtype]
    return 8 * nbytes / values


@dataclass
class GgufPlanes:
    """One GGUF tensor [rows, cols] as planes (m: Q4_1's min, the K types' dmin)."""
    qtype: str
    rows: int
    cols: int
    qs: torch.Tensor  # uint8 quants (Q6_K: the low 4 bits)
    d: torch.Tensor  # float16 [rows, blocks]
    m: torch.Tensor | None = None  # float16 [rows, blocks]
    scales: torch.Tensor | None = None  # uint8 (Q6_K: int8) sub-block scales
    qh: torch.Tensor | None = None  # uint8 high bits (Q5_K, Q6_K)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.qs, self.d, self.m, self.scales, self.qh) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device) -> GgufPlanes:
        move = lambda t: None if t is None else t.to(device).contiguous()  # noqa: E731
        return GgufPlanes(self.qtype, self.rows, self.cols, move(self.qs), move(self.d),
                          move(self.m), move(self.scales), move(self.qh))

    @staticmethod
    def cat(parts: list[GgufPlanes]) -> GgufPlanes:
        """Row-wise concatenation of tensors of one type and width (a merged layer's parts)."""
        first = parts[0]
        if any(p.qtype != first.qtype or p.cols != first.cols for p in parts):
            raise ValueError("only planes of one type and width concatenate")
        cat = lambda f: None if getattr(first, f) is None else torch.cat(  # noqa: E731
            [getattr(p, f) for p in parts])
        return GgufPlanes(first.qtype, sum(p.rows for p in parts), first.cols, cat("qs"), cat("d"),
                          cat("m"), cat("scales"), cat("qh"))


def planes_from_blocks(blocks: torch.Tensor, qtype: str, cols: int) -> GgufPlanes:
    """A tensor's blocks as the file holds them (uint8 [rows, bytes per row]) -> its planes."""
    if qtype not in LAYOUTS:
        raise ValueError(f"GGUF type {qtype} has no kernel; supported: {', '.join(TYPES)}")
    values, nbytes, fields = LAYOUTS[qtype]
    rows = blocks.shape[0]
    if cols % values or blocks.shape[1] != cols // values * nbytes:
        raise ValueError(f"{qtype} rows of {cols} values are {cols // values * nbytes} bytes in "
                         f"blocks of {values}; got {tuple(blocks.shape)}")
    b = blocks.reshape(rows, cols // values, nbytes)
    plane = {f: b[..., lo:hi].reshape(rows, -1).contiguous() for f, (lo, hi) in fields.items()}
    for f in ("d", "m"):
        if f in plane:
            plane[f] = plane[f].view(torch.float16)
    if qtype == "Q6_K":
        plane["scales"] = plane["scales"].view(torch.int8)
    return GgufPlanes(qtype, rows, cols, plane["qs"], plane["d"], plane.get("m"),
                      plane.get("scales"), plane.get("qh"))


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n * width] bytes -> [..., n, 2 * width]: each run of `width` bytes gives its low
    nibbles, then its high ones (the order of every 4-bit GGUF type)."""
    q = qs.reshape(*qs.shape[:-1], -1, width).to(torch.int32)
    return torch.cat([q & 0xF, q >> 4], dim=-1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes per block [rows, blocks, 12] -> 8 six-bit scales and mins each."""
    s = s.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc.float(), mn.float()


def dequantize(p: GgufPlanes) -> torch.Tensor:
    """The weight [rows, cols] in float32, as the blocks encode it."""
    r, t = p.rows, p.qtype
    d = p.d.float()[..., None]
    if t == "Q8_0":
        w = p.qs.view(torch.int8).reshape(r, -1, 32).float() * d
    elif t in ("Q4_0", "Q4_1"):
        q = _nibbles(p.qs, 16).float()
        w = d * q + (p.m.float()[..., None] if t == "Q4_1" else -8 * d)
    elif t in ("Q4_K", "Q5_K"):
        q = _nibbles(p.qs, 32).reshape(r, -1, 8, 32)  # [rows, blocks, sub-block, value]
        if t == "Q5_K":
            bits = torch.arange(8, device=q.device).view(8, 1)
            high = (p.qh.reshape(r, -1, 1, 32).to(torch.int32) >> bits) & 1
            q = q | (high << 4)
        sc, mn = _k_scales(p.scales.reshape(r, -1, 12))
        w = d[..., None] * sc[..., None] * q.float() - p.m.float()[..., None, None] * mn[..., None]
    elif t == "Q6_K":
        low = _nibbles(p.qs, 64).reshape(r, -1, 2, 128)  # [rows, blocks, half, value]
        shifts = torch.tensor([0, 2, 4, 6], device=low.device).view(4, 1)
        high = (p.qh.reshape(r, -1, 2, 1, 32).to(torch.int32) >> shifts) & 3
        q = (low | (high.reshape(r, -1, 2, 128) << 4)).reshape(r, -1, 16, 16) - 32
        w = d[..., None] * p.scales.reshape(r, -1, 16, 1).float() * q.float()
    else:
        raise ValueError(f"GGUF type {t} has no kernel; supported: {', '.join(TYPES)}")
    return w.reshape(r, p.cols)


def gguf_linear(x: torch.Tensor, p: GgufPlanes, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, cols] @ dequantize(p).T (+ bias), in x's dtype."""
    return torch.nn.functional.linear(x, dequantize(p).to(x.dtype), bias)
