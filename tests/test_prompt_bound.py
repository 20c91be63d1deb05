"""PromptBound never claims more tokens than the tokenizer makes, on SmolLM2's byte-level
vocabulary and a SentencePiece-style one (byte fallback, "▁" for spaces), and offers no bound
where text can vanish."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from tuili.prompt_bound import PromptBound

# the texts that pack the most bytes into a token, or lose bytes, or sit outside the vocabulary
EDGES = ["\n" + " " * 80, " " * 5000, "\t" * 300, "\x04" * 1000, "a\x04" * 500,
         "\U00040000" * 10, "<|im_start|>" * 50, "<start_of_turn>" * 50, "<sot>" * 9, "从" * 97, "\U0001f355" * 200,
         "从前有一座山" * 100, "1234567890" * 50, "ab" * 2000]
TEXT = st.lists(st.sampled_from(EDGES) | st.text(max_size=40), max_size=6).map("".join)


def sentencepiece_style() -> Tokenizer:
    """Llama/Gemma's shape: "▁" prepended and for spaces, byte-fallback BPE; its longest piece
    is 10 characters of 3 bytes each."""
    pieces = ["▁", "a", "b", "从", "▁a", "ab", "▁ab", "▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁", "从从", "从从从从",
              "从" * 8, "从" * 10]
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    vocab.update((p, 257 + i) for i, p in enumerate(pieces))
    merges = [("▁", "a"), ("a", "b"), ("▁", "ab"), ("▁", "▁"), ("▁▁", "▁▁"), ("▁▁▁▁", "▁▁▁▁"),
              ("从", "从"), ("从从", "从从"), ("从从从从", "从从从从"), ("从" * 8, "从从")]
    t = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                             fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.add_special_tokens(["<sot>"])
    return t


@pytest.fixture(scope="module")
def bounded(llm) -> list:
    """(tokenizer, its bound) for both vocabularies."""
    sp = sentencepiece_style()
    return [(llm.tokenizer.backend, PromptBound.of(llm.tokenizer.backend)),
            (sp, PromptBound.of(sp))]


def test_smollm2_bound(llm):
    bound = PromptBound.of(llm.tokenizer.backend)
    # its longest token is a newline and 80 spaces; 0x04 and 0xF1 have no token at all
    assert bound.longest == 81 and b"\x04" in bound.dropped and b"\xf1" in bound.dropped
    assert bound.min_tokens("x" * 81_000) == 1000
    assert bound.min_tokens("\x04" * 1000) == 0  # those bytes vanish: no token to count


def test_sentencepiece_style_bound(bounded):
    (tok, bound) = bounded[1]
    assert bound.longest == 30 and not bound.dropped  # "从" * 10
    assert bound.min_tokens("从" * 100) == 10 <= len(tok.encode("从" * 100).ids)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(text=TEXT)
def test_bound_never_exceeds_the_real_count(bounded, text):
    for tok, bound in bounded:
        assert bound.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False).ids)


def test_no_bound_where_text_can_vanish_or_shrink():
    vocab = {c: i for i, c in enumerate("abc ")}

    def tokenizer(normalizer=None, pre=None, **bpe) -> Tokenizer:
        t = Tokenizer(models.BPE(vocab, [], **bpe))
        if normalizer is not None:
            t.normalizer = normalizer
        if pre is not None:
            t.pre_tokenizer = pre
        return t

    byte_fallback = {"byte_fallback": True}
    assert PromptBound.of(tokenizer(pre=pre_tokenizers.WhitespaceSplit())) is None
    assert PromptBound.of(tokenizer(normalizers.NFKC(), **byte_fallback)) is None
    assert PromptBound.of(tokenizer(normalizers.Lowercase(), **byte_fallback)) is None
    assert PromptBound.of(tokenizer(normalizers.Replace("  ", " "), **byte_fallback)) is None
    # no byte fallback: unknown characters fuse into one unknown token
    assert PromptBound.of(tokenizer(unk_token="a", fuse_unk=True)) is None
    truncating = tokenizer(pre=pre_tokenizers.ByteLevel())
    truncating.enable_truncation(16)
    assert PromptBound.of(truncating) is None
