"""llama.cpp (llama-cpp-python) single-stream decode on a GGUF, in this process or in another
interpreter: llama-cpp-python may live in a venv of its own (built with AMX off), without torch.

Run as a script (`PYTHON cpu_llamacpp.py GGUF THREADS`) it loads the model, prints "ready", then
answers each line of stdin (a token count) with one timed run as JSON: {"tok_s", "cpu_s"}.
benchmarks/cpu_decode.py drives it (--llamacpp-python PATH), so both engines run in one command,
their repeats interleaved. Only the standard library and llama_cpp are imported here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."


class LlamaCpp:
    """The model in this process: `run(tokens)` -> (decode tok/s, CPU seconds of the decode)."""

    def __init__(self, gguf: str, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=threads, verbose=False)
        self.ids = self.llm.tokenize(PROMPT.encode(), add_bos=False)

    def run(self, tokens: int) -> tuple[float, float]:
        """Greedy; rate = (tokens - 1) / (first to last token), so prefill is not counted."""
        self.llm.reset()
        stamps: list[float] = []
        cpu0 = 0.0
        # generate() edits the list it is given, so hand it a copy; it yields past EOS on its own.
        for _ in self.llm.generate(list(self.ids), temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:
                cpu0 = time.process_time()
            if len(stamps) == tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), time.process_time() - cpu0

    def close(self) -> None:
        self.llm.close()


class LlamaCppProcess:
    """The same, served by `python` (another interpreter) running this file."""

    def __init__(self, python: str, gguf: str, threads: int):
        self.proc = subprocess.Popen([python, __file__, gguf, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"{python} could not start llama.cpp on {gguf} (said {line!r}); "
                               "does that interpreter have llama_cpp installed?")

    def run(self, tokens: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{tokens}\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["tok_s"], out["cpu_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def open_llamacpp(gguf: str, threads: int, python: str | None = None):
    """llama.cpp in this process, or (python given) in that interpreter."""
    return LlamaCppProcess(python, gguf, threads) if python else LlamaCpp(gguf, threads)


def serve(gguf: str, threads: int) -> None:
    llm = LlamaCpp(gguf, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        tok_s, cpu_s = llm.run(int(line))
        print(json.dumps({"tok_s": tok_s, "cpu_s": cpu_s}), flush=True)
    llm.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: cpu_llamacpp.py GGUF THREADS (then token counts on stdin)")
    serve(sys.argv[1], int(sys.argv[2]))
