"""Embeddings/s on the GPU: a BERT-base-shaped encoder (12 layers, hidden 768, random weights,
bf16) through tuili's LLM.embed beside HF transformers' BertModel (SDPA attention, padded
batch, mean pooling, L2 norm) on the same weights and texts, in the same run.

    python3 benchmarks/gpu_embed.py [--texts 512] [--repeats 3] [--dtype bfloat16]

Texts: --texts sentences of 4 to ~60 words (6 to ~70 tokens), the same for both. Batch 1: each
text in its own call; batch 64: calls of 64 texts. Each side's rate counts tokenizing, the
forward, pooling and the copy of the embeddings to the host. Best of --repeats passes after a
warm-up, the two sides interleaved; ratio = tuili's rate over HF's. The first pass also checks
that the two agree (cosine >= 0.999 per text in bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_embed import best_rates, texts  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(vocab: int):
    """A BERT-style WordPiece tokenizer of `vocab` tokens built offline: the specials, the
    benchmark's words, then random letter strings and their ## continuations."""
    import random

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from benchmarks.cpu_embed import texts as sentences

    words = sorted({w for s in sentences(64) for w in s.split()})
    tokens = SPECIALS + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?") + words
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    seen = set(tokens)
    rng = random.Random(0)
    while len(tokens) < vocab:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        w = "##" + w if rng.random() < 0.3 else w
        if w not in seen:
            seen.add(w)
            tokens.append(w)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok


def build(folder: Path, dtype: torch.dtype):
    """A random BERT-base BertModel saved with tokenizer and sentence-transformers files (mean
    pooling, Normalize); returns the HF model on the GPU and its fast tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(pad_token_id=0)  # BERT-base: 12 x 768, 30522 tokens
    with torch.device("cuda"):
        model = transformers.BertModel(config, add_pooling_layer=False).to(dtype).eval()
    model.save_pretrained(folder)
    tok = wordpiece_tokenizer(config.vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                  cls_token="[CLS]", sep_token="[SEP]",
                                                  unk_token="[UNK]", mask_token="[MASK]")
    return model, hf_tok


def hf_embedder(model, tok):
    @torch.inference_mode()
    def embed(batch: list[str]) -> torch.Tensor:
        enc = tok(batch, padding=True, return_tensors="pt").to("cuda")
        states = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(states.dtype)
        pooled = (states * mask).sum(1).float() / mask.sum(1).float()
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return embed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true",
                    help="then profile tuili's calls: the forward's share of a batch-64 call, "
                         "host ms a call outside the forward and the ops issued there, kernel "
                         "launches a call, the top CPU and CUDA ops")
    args = ap.parse_args()
    from tuili import LLM

    dtype = getattr(torch, args.dtype)
    folder = Path(tempfile.mkdtemp())
    model, tok = build(folder, dtype)
    llm = LLM(str(folder), dtype=args.dtype)
    assert llm.engine.task == "embed"
    ours_fn, theirs_fn = (lambda b: llm.embed(b) if len(b) > 1 else llm.embed(b[0])), \
        hf_embedder(model, tok)
    items = texts(args.texts)
    check = torch.nn.functional.cosine_similarity(ours_fn(items[:64]), theirs_fn(items[:64]))
    print(f"tuili vs HF on 64 texts: min cosine {float(check.min()):.5f}")
    assert float(check.min()) >= 0.999
    lens = [len(tok(t)["input_ids"]) for t in items]
    print(f"BERT-base shape (random weights, {args.dtype}), {len(items)} texts of "
          f"{min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}), "
          f"{torch.cuda.get_device_name()}\n")
    print("| batch | tuili emb/s | HF transformers emb/s | ratio |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 64):
        ours, theirs = best_rates([ours_fn, theirs_fn], items, batch, args.repeats)
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |", flush=True)
    if args.profile:
        profile(llm, ours_fn, items)


def profile(llm, embed, items: list[str]) -> None:
    """Where a batch-64 call's time goes: the forward's share of the wall time; the host work
    outside it (the forward stood in for) and the ops it issues there, at batch 1 and 64; then
    torch's profiler over a few calls (kernel launches a call, the ops that take the most host
    and device time)."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.embed_host import report

    model = llm.engine.runner.model
    forward, spent = model.forward, [0.0]

    def timed(*a, **k):
        start = time.perf_counter()
        out = forward(*a, **k)
        torch.cuda.synchronize()
        spent[0] += time.perf_counter() - start
        return out

    model.forward = timed
    calls = [items[i:i + 64] for i in range(0, len(items), 64)]
    start = time.perf_counter()
    for batch in calls:
        embed(batch)
    wall = time.perf_counter() - start
    model.forward = forward
    print(f"\nbatch 64: {wall / len(calls) * 1e3:.2f} ms a call, the forward (synchronized) "
          f"{spent[0] / len(calls) * 1e3:.2f} ms of it")
    report(llm, items)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in calls:
            embed(batch)
    averages = prof.key_averages()
    launches = sum(e.count for e in averages if "LaunchKernel" in e.key)
    print(f"{launches / len(calls):.0f} kernel launches a batch-64 call")
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(averages.table(sort_by=key, row_limit=18, max_name_column_width=60))

if __name__ == "__main__":
    main()
