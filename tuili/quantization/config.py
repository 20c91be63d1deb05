"""QuantConfig: which weight format a model runs in, from config.json's `quantization_config`
(a pre-quantized checkpoint) or from `quantization=...` (a float checkpoint quantized at load).

Unsupported methods, bit widths, group sizes and layouts fail here, before any weight is read,
with an error that names the value and lists what is supported."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuili.errors import InvalidParameter, ModelLoadError

# The engine's `quantization` values (vLLM's names where they exist).
AT_LOAD = ("fp8", "int8", "int4")  # quantize a float checkpoint's weights at load
FROM_CHECKPOINT = ("gptq", "awq", "fp8")  # read a pre-quantized checkpoint's tensors
CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors", "fp8")  # quant_method in config.json
INT4_GROUPS = (-1, 32, 64, 128)  # -1: one group per output channel
INT4_AT_LOAD_GROUP = 128


@dataclass(frozen=True)
class QuantConfig:
    method: str  # fp8, int8, int4, gptq, awq
    from_checkpoint: bool = False  # the checkpoint holds packed tensors (else quantize at load)
    bits: int = 8
    group_size: int = -1  # along the input dimension; -1: per output channel
    desc_act: bool = False  # GPTQ act-order: g_idx assigns input channels to groups
    sym: bool = True
    zero_offset: int = 0  # GPTQ v1 checkpoints store each zero point minus one
    fp8_scales: str = "channel"  # fp8 weight scales: channel, tensor or block
    block: tuple[int, int] | None = None  # fp8 block scales: (rows, columns) per scale
    ignore: tuple[str, ...] = field(default_factory=tuple)  # checkpoint module names left float
    quantize_lm_head: bool = False

    def covers(self, checkpoint_names: list[str], is_lm_head: bool) -> bool:
        """Whether a layer, known by the checkpoint names of its parts, is quantized."""
        if is_lm_head:
            return self.quantize_lm_head and "lm_head" not in self.ignore
        return not any(n in self.ignore or f"model.{n}" in self.ignore for n in checkpoint_names)


def resolve(requested: str, hf_quant: dict | None, source: str, gguf: bool,
            quantize_lm_head: bool = False) -> QuantConfig | None:
    """The QuantConfig of a load: `requested` is the engine's option (auto, none, fp8, int8,
    int4, gptq, awq); hf_quant the checkpoint's quantization_config (None if it has none)."""
    if hf_quant is not None:
        qc = from_hf(hf_quant, source)
        if requested not in ("auto", qc.method):
            raise InvalidParameter("quantization", f"got {requested!r}, but {source} is a "
                                   f"{qc.method} checkpoint; use auto or {qc.method}")
        lm_head = qc.quantize_lm_head or quantize_lm_head
        return QuantConfig(**{**qc.__dict__, "quantize_lm_head": lm_head})
    if requested in ("auto", "none") or (gguf and requested in ("int4", "gguf")):
        return None  # a GGUF file's own blocks: layers/int4.py (CPU), quantization/gguf.py
    if requested in ("gptq", "awq"):
        raise InvalidParameter("quantization", f"{requested} reads a {requested.upper()} "
                               f"checkpoint, and {source} has no quantization_config; to "
                               f"quantize float weights at load use one of {', '.join(AT_LOAD)}")
    bits = 4 if requested == "int4" else 8
    group = INT4_AT_LOAD_GROUP if requested == "int4" else -1
    return QuantConfig(requested, bits=bits, group_size=group, sym=requested != "int4",
                       quantize_lm_head=quantize_lm_head)


def from_hf(q: dict, source: str) -> QuantConfig:
    """A checkpoint's quantization_config -> QuantConfig, or a ModelLoadError naming the
    unsupported part."""
    method = str(q.get("quant_method", "?")).lower()
    parse = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed_tensors,
             "fp8": _hf_fp8}.get(method)
    if parse is None:
        raise ModelLoadError(f"{source}: quantization method {method!r} is not supported; "
                             f"supported: {', '.join(CHECKPOINT_METHODS)}")
    return parse(q, f"{source}: {method}")


def _int4(where: str, bits, group) -> tuple[int, int]:
    if bits != 4:
        raise ModelLoadError(f"{where} with {bits} bits is not supported; supported: 4")
    if group not in INT4_GROUPS:
        raise ModelLoadError(f"{where} group size {group} is not supported; supported: "
                             f"{', '.join(map(str, INT4_GROUPS))} (-1: per channel)")
    return bits, group


def _gptq(q: dict, where: str) -> QuantConfig:
    bits, group = _int4(where, q.get("bits", 4), q.get("group_size", 128))
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"{where} checkpoint_format {fmt!r} is not supported; supported: "
                             "gptq, gptq_v2")
    ignore = tuple(q.get("modules_to_not_convert") or ())
    return QuantConfig("gptq", True, bits, group, bool(q.get("desc_act", False)),
                       bool(q.get("sym", True)), 1 if fmt == "gptq" else 0, ignore=ignore,
                       quantize_lm_head=bool(q.get("lm_head", False)))


def _awq(q: dict, where: str) -> QuantConfig:
    bits, group = _int4(where, q.get("bits", q.get("w_bit", 4)),
                        q.get("group_size", q.get("q_group_size", 128)))
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(f"{where} version {version!r} is not supported; supported: gemm")
    if not q.get("zero_point", True):
        raise ModelLoadError(f"{where} without zero points is not supported; supported: "
                             "zero_point true")
    return QuantConfig("awq", True, bits, group, sym=False,
                       ignore=tuple(q.get("modules_to_not_convert") or ()))


def _compressed_tensors(q: dict, where: str) -> QuantConfig:
    """llm-compressor's FP8 schemes: float8 weights with per-channel or per-tensor scales."""
    fmt = q.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ModelLoadError(f"{where} format {fmt!r} is not supported; supported: "
                             "float-quantized (FP8 weights)")
    groups = list((q.get("config_groups") or {}).values())
    if not groups:
        raise ModelLoadError(f"{where}: config_groups is empty; expected one FP8 weight scheme")
    strategies = set()
    for g in groups:
        w = g.get("weights") or {}
        kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy", "tensor")
        if (kind, bits) != ("float", 8):
            raise ModelLoadError(f"{where} weights of type {kind!r} with {bits} bits are not "
                                 "supported; supported: type float, num_bits 8 (FP8 e4m3)")
        if strategy not in ("channel", "tensor"):
            raise ModelLoadError(f"{where} weight strategy {strategy!r} is not supported; "
                                 "supported: channel, tensor")
        strategies.add(strategy)
    return QuantConfig("fp8", True, 8, fp8_scales="channel" if "channel" in strategies else "tensor",
                       ignore=tuple(q.get("ignore") or ()))


def _hf_fp8(q: dict, where: str) -> QuantConfig:
    """transformers' fine-grained FP8: float8 weights with a scale per block (`weight_scale_inv`)."""
    block = q.get("weight_block_size")
    if block is None or len(block) != 2:
        raise ModelLoadError(f"{where} weight_block_size {block!r} is not supported; supported: "
                             "[rows, columns], e.g. [128, 128]")
    return QuantConfig("fp8", True, 8, fp8_scales="block", block=(int(block[0]), int(block[1])),
                       ignore=tuple(q.get("modules_to_not_convert") or ()))
