"""`tuili ...` with two probes, for benchmarks/gpu_serve.py: every Triton compilation (a kernel not
yet in the in-memory cache) and every engine step slower than TUILI_PROBE_SLOW_MS go as JSON
lines, stamped with time.time(), to TUILI_PROBE_LOG.

    TUILI_PROBE_LOG=probe.jsonl python3 benchmarks/serve_probe.py serve --model ...
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_lock = threading.Lock()
_log = open(os.environ.get("TUILI_PROBE_LOG", "probe.jsonl"), "a")


def record(kind: str, **fields) -> None:
    with _lock:
        _log.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")
        _log.flush()


def install() -> None:
    import triton

    def on_compile(*, key, repr, fn, compile, is_manual_warmup, already_compiled, **_):
        record("compile", name=fn.name, repr=str(repr)[:300])
        return False

    triton.knobs.runtime.jit_cache_hook = on_compile

    from tuili.engine.engine import LLMEngine

    slow_s = float(os.environ.get("TUILI_PROBE_SLOW_MS", "50")) / 1e3
    step = LLMEngine.step

    def timed_step(self):
        sched = self.scheduler
        running, waiting = len(sched.running), len(sched.waiting)
        start = time.perf_counter()
        outs = step(self)
        took = time.perf_counter() - start
        if took > slow_s:
            record("step", ms=round(took * 1e3, 1), running=running, waiting=waiting,
                   outputs=len(outs))
        return outs

    LLMEngine.step = timed_step


if __name__ == "__mp_main__":  # the engine's process (spawned) imports this file under that name
    install()

if __name__ == "__main__":
    install()
    from tuili.cli import main

    sys.exit(main(sys.argv[1:]))
