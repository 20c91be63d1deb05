"""Where a batch-1 decode step's time goes: does the GPU wait on Python between steps?

For each shape, a random-weight model streams one request at batch 1 (greedy, as
gpu_workloads.tuili_decode_ms does). Reported:
  - GPU timeline (torch profiler, CUDA activity only): the steps split at each argmax kernel (the
    decode graph's last), each step's span and the GPU's idle time in it (median, p90, max, mean,
    and the idle of every step in order, so a period shows), for the engine's stream and for
    back-to-back replays of the same graph;
  - host side (no profiler): microseconds a step in each engine phase, the host cost of launching
    the graph while the GPU is busy, and of launching it again while its last launch is queued;
  - the stream's time per token again after gc.freeze() (as vLLM does after start-up).

    python benchmarks/gpu_step_gaps.py [--shapes smollm2-135m,llama3-8b] [--tokens 48]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu_workloads import FULL_LAYERS, tuili_decode_ms  # noqa: E402
from tests.gpu.random_models import build  # noqa: E402
from tuili import LLM, SamplingParams  # noqa: E402
from tuili.engine import transfer  # noqa: E402

STEP_END = "argmax"  # the last kernel of a decode graph


def step_gaps(events: list[tuple[str, float, float]], skip: int = 3) -> list[tuple[float, float]]:
    """(span, idle) in us of each step of a GPU timeline of (name, start, end) sorted by start:
    a step runs from one STEP_END kernel's end to the next one's; idle is the time in it when no
    GPU activity runs. The first `skip` steps (warming) and the last (the stream's tail) are left
    out."""
    ends = [i for i, (name, _, _) in enumerate(events) if STEP_END in name]
    steps = []
    for a, b in zip(ends[skip:-2], ends[skip + 1:-1]):
        t0, t1 = events[a][2], events[b][2]
        busy_until, idle = t0, 0.0
        for _, start, end in events[a + 1:b + 1]:
            idle += max(0.0, start - busy_until)
            busy_until = max(busy_until, end)
        steps.append((t1 - t0, idle))
    return steps


def gpu_timeline(fn) -> list[tuple[str, float, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
           if e.device_type.name == "CUDA"]
    return sorted(gpu, key=lambda e: e[1])


def summary(label: str, steps: list[tuple[float, float]]) -> None:
    spans = [s for s, _ in steps]
    idles = sorted(i for _, i in steps)
    print(f"  {label}: {len(steps)} steps, span mean {statistics.mean(spans):.1f} us; GPU idle "
          f"median {idles[len(idles) // 2]:.1f}, p90 {idles[int(len(idles) * 0.9)]:.1f}, "
          f"max {idles[-1]:.1f}, mean {statistics.mean(idles):.1f} us")
    print("    idle per step, in order:", " ".join(f"{i:.0f}" for _, i in steps))


class PhaseTimer:
    """Wall time spent in wrapped callables (methods of a class or of one object), per name;
    nested ones count in both. undo() puts the originals back."""

    def __init__(self):
        self.total = defaultdict(float)
        self.order = []  # (owner, attr, name) as wrapped
        self._undo = []

    def wrap(self, owner, attr: str, name: str) -> None:
        real = getattr(owner, attr)
        own = attr in vars(owner)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start

        self.order.append((owner, attr, name))
        setattr(owner, attr, timed)  # on a class, a plain function binds as a method
        self._undo.append((owner, attr, real if own else None))

    def undo(self) -> None:
        for owner, attr, real in reversed(self._undo):
            if real is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, real)
        self._undo.clear()


def host_phases(llm: LLM, prompt: list[int], tokens: int) -> None:
    """Host time per decode step in each engine phase; counted from the third output on, so the
    prompt's step (eager, and waited for) is left out."""
    engine = llm.engine
    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "execute", "execute (inputs + launch)")
    timer.wrap(torch.cuda.CUDAGraph, "replay", "  of which graph launch")
    timer.wrap(engine, "_sample", "sample (queue)")
    timer.wrap(engine, "_resolve", "resolve (read-back + outputs)")
    timer.wrap(transfer.HostCopy, "get", "  of which waiting for the GPU")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    names = [name for *_, name in timer.order]
    try:
        steps, start = 0, 0.0
        for i, _ in enumerate(llm.stream(prompt, params)):
            if i == 2:
                timer.total.clear()
                start = time.perf_counter()
            steps += i > 2
        wall = time.perf_counter() - start
    finally:
        timer.undo()
    print(f"  host, per decode step ({wall / steps * 1e6:.0f} us a step, wrappers on):")
    for name in names:
        print(f"    {name:34s} {timer.total[name] / steps * 1e6:8.1f} us")


def launch_costs(graph: torch.cuda.CUDAGraph) -> None:
    """Host time of graph.replay() behind a sleeping GPU, then again with that launch queued."""
    first, again = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of ms: both launches return long before it ends
        start = time.perf_counter()
        graph.replay()
        mid = time.perf_counter()
        graph.replay()
        end = time.perf_counter()
        torch.cuda.synchronize()
        first.append(mid - start)
        again.append(end - mid)
    print(f"  graph launch on the host: {statistics.median(first) * 1e6:.1f} us, with its last "
          f"launch still queued {statistics.median(again) * 1e6:.1f} us (a blocking launch would "
          f"take milliseconds here)")


def upload_costs(device: torch.device) -> None:
    """Host time of a step-sized input upload behind a sleeping GPU: transfer.upload (the values
    made a tensor, copied from pageable memory), and the copy alone of a ready pinned tensor.
    Milliseconds would mean the copy waited for the stream, so the GPU would idle while the host
    finishes preparing the step after it."""
    dst = torch.zeros(3, 1, dtype=torch.long, device=device)
    pinned = torch.zeros(3, 1, dtype=torch.long).pin_memory()
    costs = defaultdict(list)
    for _ in range(5):
        for label, copy in (("transfer.upload", lambda: transfer.upload(dst, [[5], [6], [7]])),
                            ("a ready pinned tensor's copy",
                             lambda: dst.copy_(pinned, non_blocking=True))):
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
            start = time.perf_counter()
            copy()
            costs[label].append(time.perf_counter() - start)
            torch.cuda.synchronize()
    print("  input upload on the host behind a busy GPU: " + ", ".join(
        f"{k} {statistics.median(v) * 1e6:.1f} us" for k, v in costs.items()))


def run_shape(name: str, tokens: int) -> None:
    folder = Path(tempfile.mkdtemp())
    vocab = build(name, folder, num_layers=FULL_LAYERS[name]).config.vocab_size
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", max_num_seqs=8, max_model_len=4096,
              kv_cache_memory_gb=4)
    prompt = [random.Random(0).randrange(2, vocab) for _ in range(128)]
    # the best of two streams: the first warms up
    print(f"{name}: batch-1 stream {tuili_decode_ms(llm, prompt, tokens):.3f} ms a token")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    summary("engine stream", step_gaps(gpu_timeline(lambda: list(llm.stream(prompt, params)))))
    graph = llm.engine.runner.graphs.graphs[1]
    summary("graph replays", step_gaps(gpu_timeline(lambda: [graph.replay() for _ in range(tokens)])))
    host_phases(llm, prompt, tokens)
    launch_costs(graph)
    upload_costs(llm.engine.runner.device)
    gc.collect()
    gc.freeze()
    print(f"  after gc.freeze(): stream {tuili_decode_ms(llm, prompt, tokens):.3f} ms a token")
    gc.unfreeze()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    for name in args.shapes.split(","):
        run_shape(name, args.tokens)


if __name__ == "__main__":
    main()
