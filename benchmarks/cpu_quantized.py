"""CPU decode speed of SmolLM2-135M with its weights quantized at load, beside the bf16 engine.

Run: python benchmarks/cpu_quantized.py [--formats none,int8,int4,fp8,gguf-int4] [--tokens 64]
                                         [--repeats 2] [--threads N]

The GGUF is written out once as an HF folder (float weights); each format loads that folder in
bfloat16 with quantization=FORMAT ("gguf-int4": the GGUF itself with its Q4_1 blocks packed, the
default CPU path). Single stream, greedy, decode only (as benchmarks/cpu_decode.py measures it);
best of --repeats after a warm-up. The ratio column is each rate over "none" (bf16 weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_decode import best_of, tuili_single  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="none,int8,int4,fp8,gguf-int4")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from tuili import LLM
    from tuili.models.export import export_hf_folder
    from tuili.models.loader import resolve

    folder = Path(tempfile.mkdtemp()) / "smollm2"
    export_hf_folder(resolve("smollm2-135m"), folder)
    rates = {}
    for fmt in args.formats.split(","):
        if fmt == "gguf-int4":
            llm = LLM("smollm2-135m", dtype="bfloat16", num_threads=args.threads)
        else:
            llm = LLM(str(folder), dtype="bfloat16", quantization=fmt, num_threads=args.threads)
        rates[fmt] = best_of(lambda: tuili_single(llm, args.tokens), args.repeats)
        del llm
    base = rates.get("none")
    print(f"{'format':<10} {'tok/s':>7} {'vs bf16':>8}")
    for fmt, rate in rates.items():
        print(f"{fmt:<10} {rate:7.1f} {rate / base if base else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
