"""Write a GGUF model out as a Hugging Face folder (config, safetensors, tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

from tuili.models.gguf_file import open_gguf


def export_hf_folder(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantized float32 weights under HF names, plus the tokenizer and chat template."""
    from safetensors.torch import save_file

    gguf = open_gguf(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gguf.config()
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "factors":
        raise ValueError("GGUF rope_freqs factors have no HF config form; cannot export")
    tok = gguf.tokenizer()
    _write_json(out / "config.json", config.to_hf())
    tensors = {name: t.contiguous() for name, t in gguf.weights()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.backend.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "chat_template": tok.chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos,
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids,
    })
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
