"""Pictures of the analysis (matplotlib, Agg backend): the roofline with each operator placed,
decode throughput against latency over batch sizes, and where the time goes per phase."""

from __future__ import annotations

from pathlib import Path

DPI = 100
SIZE = (1200, 800)  # pixels
PHASE_MARKERS = {"prefill": "o", "decode": "s"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(size: tuple[int, int]):
    plt = _pyplot()
    return plt, plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the file keeps the asked size
    plt.close(fig)
    return path


def plot_roofline(result: dict, path: str | Path, size: tuple[int, int] = SIZE) -> Path:
    """Attainable FLOP/s against intensity, with every prefill and decode operator on it."""
    plt, fig = _figure(size)
    ax = fig.add_subplot()
    d = result["device"]
    peak, bw = d["peak_flops_compute"], d["bandwidth_bytes_per_s"]
    ops = [op for ph in ("prefill", "decode") for op in result[ph]["ops"] if op["intensity"] > 0]
    lo = min([0.1, *(op["intensity"] for op in ops)]) / 2
    hi = max([d["ridge"] * 10, *(op["intensity"] for op in ops)]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.loglog(xs, [min(peak, bw * x) for x in xs], color="black", lw=2, label="roofline")
    ax.axvline(d["ridge"], color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {d['ridge']:.0f} FLOP/B", (d["ridge"], peak), textcoords="offset points",
                xytext=(5, -15), fontsize=9, color="grey")
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(op["name"] for op in ops))
    for phase, marker in PHASE_MARKERS.items():
        for op in result[phase]["ops"]:
            if op["intensity"] > 0:  # the embedding gather does no arithmetic: off a log axis
                ax.scatter(op["intensity"], op["flops"] / op["time_s"], marker=marker, s=80,
                           zorder=3, color=cmap(names.index(op["name"]) % 10), alpha=0.85,
                           edgecolors="black", linewidths=0.5)
    for i, name in enumerate(names):
        ax.scatter([], [], marker="o", color=cmap(i % 10), label=name)
    for phase, marker in PHASE_MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)
    m = result["model"]
    ax.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="attainable FLOP/s",
           title=f"{m['name'] or m['architecture']} on {d['name']}: batch {result['batch']}, "
                 f"prompt {result['prompt']} (at the bound)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(plt, fig, path)


def plot_batch_sweep(result: dict, path: str | Path, size: tuple[int, int] = SIZE) -> Path:
    """Decode throughput ceiling against time per output token, one point per batch size."""
    plt, fig = _figure(size)
    ax = fig.add_subplot()
    rows = result["sweep"]["rows"]
    x = [r["tpot_s"] * 1e3 for r in rows]
    y = [r["tokens_per_s"] for r in rows]
    ax.plot(x, y, "-", color="tab:blue", zorder=1)
    for r, xi, yi in zip(rows, x, y):
        style = dict(marker="o" if r["linears_bound"] == "memory" else "^",
                     color="tab:blue" if r["fits_memory"] else "lightgrey")
        ax.scatter(xi, yi, s=60, zorder=2, **style)
        ax.annotate(f"B={r['batch']}", (xi, yi), textcoords="offset points", xytext=(6, -10),
                    fontsize=8)
    ax.scatter([], [], marker="o", color="tab:blue", label="linears memory-bound")
    ax.scatter([], [], marker="^", color="tab:blue", label="linears compute-bound")
    ax.scatter([], [], marker="o", color="lightgrey", label="K/V does not fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="time per output token, floor (ms)", ylabel="decode tokens/s, ceiling",
           title=f"decode over batch sizes at context {result['sweep']['context']} on "
                 f"{result['device']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(plt, fig, path)


def plot_phase_times(phases: dict[str, dict[str, float]], path: str | Path, title: str = "",
                     size: tuple[int, int] = SIZE) -> Path:
    """One horizontal stacked bar per phase: its seconds split by component."""
    plt, fig = _figure(size)
    ax = fig.add_subplot()
    names = list(phases)
    components = list(dict.fromkeys(k for parts in phases.values() for k in parts))
    cmap = plt.get_cmap("tab10")
    left = [0.0] * len(names)
    for i, comp in enumerate(components):
        widths = [phases[n].get(comp, 0.0) * 1e3 for n in names]
        ax.barh(names, widths, left=left, color=cmap(i % 10), label=comp)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.annotate(f"{total:.4g} ms", (total, y), textcoords="offset points", xytext=(4, 0),
                    va="center", fontsize=9)
    ax.set(xlabel="milliseconds", title=title or "where the time goes")
    ax.set_xlim(0, max(left, default=0) * 1.15 or 1)
    ax.invert_yaxis()
    fig.subplots_adjust(left=0.2)
    ax.legend(loc="lower right")
    return _save(plt, fig, path)


def phase_breakdown(result: dict) -> dict[str, dict[str, float]]:
    """The analysis' per-operator floors, grouped by phase, for plot_phase_times."""
    return {f"{ph} (batch {result['batch']})": {op["name"]: op["time_s"] for op in result[ph]["ops"]}
            for ph in ("prefill", "decode")}


def plot_all(result: dict, path: str | Path) -> list[Path]:
    """The roofline at `path`; the batch sweep and phase times beside it (-batch, -phases)."""
    path = Path(path)
    sibling = lambda tag: path.with_name(f"{path.stem}-{tag}{path.suffix or '.png'}")  # noqa: E731
    return [plot_roofline(result, path),
            plot_batch_sweep(result, sibling("batch")),
            plot_phase_times(phase_breakdown(result), sibling("phases"),
                             f"lower-bound time per operator on {result['device']['name']}")]
