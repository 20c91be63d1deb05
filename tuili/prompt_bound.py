"""A lower bound on a text's token count from its UTF-8 bytes, to refuse a prompt that cannot fit
in the context before paying to tokenize all of it.

tokens >= kept bytes / L, where no token covers more than L input bytes and "kept" are the bytes
that end up inside some token. That needs a pipeline known to keep the text: no normalizer that
can shrink it (NFC, lowercasing), no pre-tokenizer that removes characters (whitespace
splitting), no fused unknown token. A byte-level vocabulary may lack a few bytes (SmolLM2 has no
token for 0x04, nor for 0xF1, the lead byte of U+40000..U+7FFFF): those vanish from the input and
are not counted. For any other tokenizer there is no bound and the prompt is tokenized in full.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

# Pre-tokenizers that split or re-spell text but keep all of it (Split too, unless "removed").
_KEEPING_PRE = {"ByteLevel", "Metaspace", "Digits", "Split", "UnicodeScripts"}


@dataclass(frozen=True)
class PromptBound:
    longest: int  # the most input bytes one token stands for
    dropped: bytes = b""  # bytes that no token holds: they add no token

    @classmethod
    def of(cls, backend: HFTokenizer) -> PromptBound | None:
        """The bound for this tokenizer, or None when its pipeline is not known to keep text."""
        model = backend.model
        if type(model).__name__ != "BPE" or backend.truncation is not None:
            return None
        pre, norm = _steps(backend.pre_tokenizer), _steps(backend.normalizer)
        if pre is None or norm is None or not all(map(_keeps_text, pre)) \
                or not all(map(_never_shrinks, norm)):
            return None
        vocab = backend.get_vocab(with_added_tokens=False)
        if not vocab:
            return None
        added = [len(t.content.encode()) for t in backend.get_added_tokens_decoder().values()]
        if any(p["type"] == "ByteLevel" for p in pre):
            # each character of a byte-level token stands for one input byte
            dropped = bytes(b for b, ch in enumerate(_byte_chars()) if ch not in vocab)
            return cls(max([*map(len, vocab), *added]), dropped)
        if model.byte_fallback and all(f"<0x{b:02X}>" in vocab for b in range(256)):
            # a token's UTF-8 length is at least what it covers ("▁" is 3 bytes for 1, "<0x41>" 6)
            return cls(max([*(len(t.encode()) for t in vocab), *added]))
        return None  # unknown characters would become (possibly fused) unknown tokens

    def min_tokens(self, text: str) -> int:
        """At least this many tokens in `text` (special tokens the tokenizer adds come on top)."""
        data = text.encode("utf-8", "surrogatepass")
        kept = len(data.translate(None, self.dropped)) if self.dropped else len(data)
        return -(-kept // self.longest)


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control and space bytes are moved past 255, in order
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _steps(component) -> list[dict] | None:
    """A normalizer's or pre-tokenizer's steps as JSON (a Sequence flattened); None if nested."""
    if component is None:
        return []
    cfg = json.loads(component.__getstate__())
    if cfg.get("type") != "Sequence":
        return [cfg]
    steps = cfg.get("normalizers") or cfg.get("pretokenizers") or []
    return None if any(s.get("type") == "Sequence" for s in steps) else steps


def _keeps_text(step: dict) -> bool:
    kind = step.get("type")
    if kind == "Split":
        return str(step.get("behavior", "")).lower() != "removed"
    return kind in _KEEPING_PRE


def _never_shrinks(step: dict) -> bool:
    """A normalizer step that never makes the text shorter in bytes."""
    kind = step.get("type")
    if kind == "Prepend":
        return True
    if kind == "Replace":
        pattern = (step.get("pattern") or {}).get("String")
        content = step.get("content", "")
        return pattern is not None and len(content.encode()) >= len(pattern.encode())
    return False
