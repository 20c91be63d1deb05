"""tuili router: one OpenAI-compatible front over many `tuili serve` workers (models, versions
and their weights, prefix-affine balancing, health, one retry before the first byte)."""
