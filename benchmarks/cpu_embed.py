"""Embeddings/s of all-MiniLM-L6-v2 on the CPU: tuili's LLM.embed beside sentence-transformers'
SentenceTransformer.encode on the same files, in the same run.

Run: python benchmarks/cpu_embed.py [--dtypes float32,bfloat16] [--texts 256] [--repeats 3]
     [--host]

Texts: --texts sentences of mixed length (4 to ~60 words), the same for both. Batch 1: each text
in its own call (embed(text) / encode([text])); batch 64: calls of 64 texts (encode's
batch_size=64). Both normalize (the model's Normalize module). Best of --repeats passes after a
warm-up, tuili's and sentence-transformers' passes interleaved (a shared machine's busy spells
fall on both); ratio = tuili's rate over sentence-transformers' at the same dtype and batch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts(count: int) -> list[str]:
    rng = random.Random(0)
    words = ("the a model engine fast embedding vector search query document paris france "
             "language token batch kernel memory cache attention layer python tensor cpu "
             "server request response latency throughput score rank").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 60))) for _ in range(count)]


def best_rates(fns: list, items: list, batch: int, repeats: int) -> list[float]:
    """Each fn's best rate over `repeats` passes, the fns' passes interleaved so that a busy
    spell of a shared machine falls on both."""
    for fn in fns:
        fn(items[:batch])  # warm-up
    best = [0.0] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            for i in range(0, len(items), batch):
                fn(items[i:i + batch])
            best[j] = max(best[j], len(items) / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--host", action="store_true",
                    help="print tuili's host ms per call outside the forward, and its ops there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from tuili import LLM
    from tuili.models.loader import resolve

    items = texts(args.texts)
    rows = []
    for dtype in args.dtypes.split(","):
        llm = LLM("all-minilm-l6-v2", dtype=dtype)
        if args.host:
            from benchmarks.embed_host import report

            print(dtype)
            report(llm, items, args.repeats)
            continue
        st = SentenceTransformer(str(resolve("all-minilm-l6-v2")), device="cpu",
                                 model_kwargs={"dtype": getattr(torch, dtype)})
        for batch in (1, 64):
            ours, theirs = best_rates(
                [lambda b: llm.embed(b) if batch > 1 else llm.embed(b[0]),
                 lambda b: st.encode(b, batch_size=batch)], items, batch, args.repeats)
            rows.append((dtype, batch, ours, theirs))
            print(f"{dtype:9s} batch {batch:3d}: tuili {ours:8.1f}/s  sentence-transformers "
                  f"{theirs:8.1f}/s  {ours / theirs:.2f}x", flush=True)
        del llm, st
    if not rows:
        return
    print("\n| dtype | batch | tuili emb/s | sentence-transformers emb/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for dtype, batch, ours, theirs in rows:
        print(f"| {dtype} | {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
