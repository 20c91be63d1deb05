#!/usr/bin/env bash
# On a GPU machine: run the GPU tests and the GPU benchmarks in one go, ending with one table.
# Uses the machine's python3 (torch, transformers and pytest installed); tuili runs from this tree.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu_decode.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmarks exit $bench"
exit $(( tests || bench ))
