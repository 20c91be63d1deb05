"""`tuili analyze`: assemble the analysis of one model on one device, print it, write it out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tuili.analysis import mamba, memory, roofline
from tuili.analysis import ops as opsmod
from tuili.analysis.devices import Device
from tuili.errors import InvalidParameter
from tuili.models.config import ModelConfig

SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def analyze(c: ModelConfig, device: Device, precision: opsmod.Precision, batch: int = 1,
            prompt: int = 512, context: int | None = None, model_name: str = "",
            source: str = "") -> dict:
    """Everything `tuili analyze` reports, as plain data (numbers in FLOPs, bytes, seconds)."""
    if batch < 1:
        raise InvalidParameter("batch", f"got {batch}, must be >= 1")
    if not 1 <= prompt <= c.max_position_embeddings:
        raise InvalidParameter("prompt", f"got {prompt}, must be in [1, {c.max_position_embeddings}]")
    context = context or prompt + 1  # the first decode step sees the prompt and its own token
    pre = roofline.place_all(opsmod.prefill_ops(c, batch, prompt, precision), device, "prefill")
    dec = roofline.place_all(opsmod.decode_ops(c, batch, context, precision), device, "decode")
    pre_t, dec_t = roofline.totals(pre), roofline.totals(dec)
    plan = memory.plan(c, precision, device.memory_bytes)
    fits = plan.max_batch(context)
    sweep = roofline.decode_sweep(c, device, context, precision, list(SWEEP_BATCHES), fits)
    params = opsmod.num_params(c)
    return {
        "model": {"name": model_name, "source": source, "architecture": c.architecture,
                  "params": params["layers"] + params["tables"], "layers": c.num_layers,
                  "active_params": opsmod.active_params(c),
                  "experts": vars(c.moe).copy() if c.moe else None,
                  "hidden": c.hidden_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                  "head_dim": c.head_dim, "intermediate": c.intermediate_size,
                  "vocab": c.vocab_size, "max_context": c.max_position_embeddings,
                  "sliding_windows": sorted({w for w in c.windows() if w}),
                  "sliding_layers": sum(1 for w in c.windows() if w),
                  "mixer_layers": mamba.mixer_layers(c)},
        "device": {"name": device.name, "bandwidth_bytes_per_s": device.bandwidth,
                   "peak_flops": device.flops, "memory_bytes": device.memory_bytes,
                   "compute_dtype": opsmod.compute_dtype(precision.weights),
                   "peak_flops_compute": device.peak_flops(opsmod.compute_dtype(precision.weights)),
                   "ridge": device.ridge(opsmod.compute_dtype(precision.weights)),
                   "note": device.note},
        "precision": vars(precision).copy(),
        "batch": batch, "prompt": prompt, "decode_context": context,
        "prefill": {"ops": [p.as_dict() for p in pre], "flops": pre_t.flops, "bytes": pre_t.bytes,
                    "intensity": pre_t.intensity, "ttft_floor_s": pre_t.time_s},
        "decode": {"ops": [p.as_dict() for p in dec], "flops": dec_t.flops, "bytes": dec_t.bytes,
                   "intensity": dec_t.intensity, "tpot_floor_s": dec_t.time_s,
                   "tokens_per_s_ceiling": batch / dec_t.time_s,
                   "kv_read_bytes_per_seq": memory.kv_bytes_read(c, context, precision.kv),
                   "kv_read_bytes_per_seq_full": memory.kv_bytes_per_token(c, precision.kv) * context},
        "memory": plan.as_dict(),
        "sweep": {"context": context, "rows": [r.as_dict() for r in sweep],
                  "linears_compute_bound_at": roofline.decode_crossover(c, device, context, precision),
                  "step_compute_bound_at": roofline.decode_crossover(c, device, context, precision,
                                                                     "step")},
    }


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """Plain aligned columns (numbers right-aligned), or a markdown table."""
    cells = [[str(x) for x in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and cells for i in range(len(headers))]
    fmt = lambda r: "  ".join(v.rjust(w) if num else v.ljust(w)  # noqa: E731
                              for v, w, num in zip(r, widths, numeric)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x").replace(",", ""))
        return True
    except ValueError:
        return False


def si(value: float, unit: str = "") -> str:
    """1.23e9 -> '1.23 G' + unit."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def op_rows(result: dict) -> list[list]:
    rows = []
    for phase in ("prefill", "decode"):
        for op in result[phase]["ops"]:
            rows.append([phase, op["name"], si(op["flops"]), si(op["bytes"], "B"),
                         f"{op['intensity']:.3g}", f"{op['ridge']:.3g}", op["bound"],
                         _ms(op["time_s"])])
    return rows


OP_HEADERS = ["phase", "operator", "FLOPs", "bytes", "FLOP/B", "ridge", "bound", "min ms"]


def format_report(r: dict, markdown: bool = False) -> str:
    m, d, mem, sw = r["model"], r["device"], r["memory"], r["sweep"]
    p = r["precision"]
    title = "## " if markdown else ""
    out = [f"{title}{m['name'] or m['architecture']}: {m['params'] / 1e9:.3g}B params"
           f"{_experts(m)}, "
           f"{m['layers']} layers, hidden {m['hidden']}, heads {m['heads']}/{m['kv_heads']} kv",
           f"device {d['name']}: {d['bandwidth_bytes_per_s'] / 1e9:.4g} GB/s, "
           f"{d['peak_flops_compute'] / 1e12:.4g} TFLOP/s {d['compute_dtype']}, ridge "
           f"{d['ridge']:.1f} FLOP/B, {d['memory_bytes'] / 1e9:.1f} GB",
           f"weights {p['weights']} (head {p['head']}), KV {p['kv']}; batch {r['batch']}, "
           f"prompt {r['prompt']} tokens, decode at context {r['decode_context']}", "",
           format_table(OP_HEADERS, op_rows(r), markdown), "",
           f"TTFT floor (prefill of {r['batch']} x {r['prompt']}): "
           f"{_ms(r['prefill']['ttft_floor_s'])} ms, intensity {r['prefill']['intensity']:.3g} FLOP/B",
           f"time-per-output-token floor (decode, batch {r['batch']}): "
           f"{_ms(r['decode']['tpot_floor_s'])} ms -> at most "
           f"{r['decode']['tokens_per_s_ceiling']:,.0f} tok/s, intensity "
           f"{r['decode']['intensity']:.3g} FLOP/B", *_window_lines(r), *_state_lines(r), "",
           f"memory: weights {mem['weight_bytes'] / 2**30:.2f} GiB, KV {mem['kv_bytes_per_token'] / 1024:.4g} "
           f"KiB/token, {mem['kv_budget_bytes'] / 2**30:.2f} GiB for KV at utilization "
           f"{mem['utilization']} -> {mem['max_kv_tokens']:,} tokens",
           format_table(["context", "max batch"],
                        [[f"{k:,}", f"{v:,}"] for k, v in mem["max_batch_by_context"].items()],
                        markdown), "",
           f"decode batch sweep at context {sw['context']}:",
           format_table(["batch", "TPOT ms", "tok/s", "FLOP/B step", "FLOP/B linears", "linears",
                         "step", "fits"],
                        [[s["batch"], _ms(s["tpot_s"]), f"{s['tokens_per_s']:,.0f}",
                          f"{s['intensity']:.3g}", f"{s['linear_intensity']:.3g}",
                          s["linears_bound"], s["step_bound"], "yes" if s["fits_memory"] else "no"]
                         for s in sw["rows"]], markdown),
           _crossover_line(sw)]
    return "\n".join(out)


def _experts(m: dict) -> str:
    e = m.get("experts")
    if not e:
        return ""
    shared = " + a shared expert" if e["shared_intermediate_size"] else ""
    return (f" ({m['active_params'] / 1e9:.3g}B active: top-{e['top_k']} of "
            f"{e['num_experts']} experts{shared})")


def _window_lines(r: dict) -> list[str]:
    """What the sliding windows save at decode (nothing for a model without them)."""
    m, dec = r["model"], r["decode"]
    if not m.get("sliding_layers"):
        return []
    windows = ", ".join(f"{w:,}" for w in m["sliding_windows"])
    return [f"sliding windows: {m['sliding_layers']} of {m['layers']} layers see the last "
            f"{windows} tokens; a decode step reads {dec['kv_read_bytes_per_seq'] / 2**20:.4g} MiB "
            f"of K/V a sequence at context {r['decode_context']:,} "
            f"({dec['kv_read_bytes_per_seq_full'] / 2**20:.4g} MiB without the windows)"]


def _state_lines(r: dict) -> list[str]:
    """A hybrid's fixed state per sequence beside its attention layers' K/V (nothing otherwise)."""
    m, mem = r["model"], r["memory"]
    if not m.get("mixer_layers"):
        return []
    return [f"recurrent state: {m['mixer_layers']} of {m['layers']} layers are Mamba-2 mixers, "
            f"{mem['state_bytes_per_seq'] / 2**20:.4g} MiB a sequence whatever its length; the "
            f"other {m['layers'] - m['mixer_layers']} keep "
            f"{mem['kv_bytes_per_token'] / 1024:.4g} KiB of K/V a token"]


def _crossover_line(sweep: dict) -> str:
    lin, step = sweep["linears_compute_bound_at"], sweep["step_compute_bound_at"]
    text = (f"decode: the linears turn compute-bound at batch {lin}" if lin else
            "decode: the linears stay memory-bound at every batch")
    if step:
        return text + f"; the whole step at batch {step}"
    return text + "; the whole step never does (each sequence's K/V reads grow with the batch)"


def write_output(r: dict, path: str | Path) -> Path:
    """JSON (everything), CSV (one row per operator) or markdown (the report), by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            keys = ["phase", "name", "flops", "bytes", "intensity", "ridge", "bound", "time_s"]
            writer.writerow(keys)
            for phase in ("prefill", "decode"):
                for op in r[phase]["ops"]:
                    writer.writerow([op[k] for k in keys])
    elif suffix in (".md", ".markdown"):
        path.write_text(format_report(r, markdown=True) + "\n")
    else:
        raise InvalidParameter("output", f"got {path.name!r}: the extension must be .json, .csv or .md")
    return path
