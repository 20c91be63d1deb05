#!/usr/bin/env bash
# On a GPU machine: run the GPU tests and the GPU benchmarks in one go, each ending with a table.
# Uses the machine's python3 (torch, transformers and pytest installed); tuili runs from this tree.
#   scripts/gpu_check.sh                 tests, kernel benchmarks, all workload shapes
#   SHAPES=smollm2-135m scripts/gpu_check.sh
#   PARTS=kernels,workloads scripts/gpu_check.sh   (any of tests, kernels, workloads; all three
#                                                  are the default. On an H100 the tests take
#                                                  about 9 minutes, kernels 2, workloads 6)
#   PARTS=ab AB=TUILI_TUNE_AS=h100,h200 scripts/gpu_check.sh   a switch A/B'd, a process per
#                                                  setting over one saved model per shape
#                                                  (benchmarks/gpu_ab.py; SHAPES as above)
#   PARTS=gaps scripts/gpu_check.sh                whether the GPU waits on Python between batch-1
#                                                  decode steps (benchmarks/gpu_step_gaps.py)
#   PARTS=serve scripts/gpu_check.sh               `tuili serve` on the 8B shape under `tuili bench
#                                                  serve` (256 x (512, 256) at once, at 8 and 24
#                                                  req/s) beside LLM.generate (benchmarks/gpu_serve.py;
#                                                  needs fastapi/uvicorn, and py-spy for the GIL)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
parts=",${PARTS:-tests,kernels,workloads},"
tests=0 kernels=0 workloads=0 ab=0 gaps=0 serve=0
if [[ $parts == *,tests,* ]]; then
  python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
  tests=${PIPESTATUS[0]}
fi
if [[ $parts == *,kernels,* ]]; then
  python3 benchmarks/gpu_kernels.py --json "$out/gpu_kernels.json" 2>&1 | tee "$out/gpu_kernels.log"
  kernels=${PIPESTATUS[0]}
fi
if [[ $parts == *,workloads,* ]]; then
  python3 benchmarks/gpu_workloads.py --shapes "${SHAPES:-smollm2-135m,qwen3-0.6b,llama3-8b}" \
    --json "$out/gpu_workloads.json" 2>&1 | tee "$out/gpu_workloads.log"
  workloads=${PIPESTATUS[0]}
fi
if [[ $parts == *,ab,* ]]; then
  IFS=, read -ra ab_shapes <<< "${SHAPES:-smollm2-135m,llama3-8b}"
  for shape in "${ab_shapes[@]}"; do
    python3 benchmarks/gpu_ab.py --shape "$shape" --env "${AB:-TUILI_TUNE_AS=h100,h200}" 2>&1 \
      | tee -a "$out/gpu_ab.log"
    (( ab = ab || PIPESTATUS[0] ))
  done
fi
if [[ $parts == *,gaps,* ]]; then
  python3 benchmarks/gpu_step_gaps.py --shapes "${SHAPES:-smollm2-135m,llama3-8b}" 2>&1 \
    | grep -v "capturing decode CUDA graphs\|Writing model shards" | tee "$out/gpu_step_gaps.log"
  gaps=${PIPESTATUS[0]}
fi
if [[ $parts == *,serve,* ]]; then
  python3 benchmarks/gpu_serve.py --shape "${SHAPES:-llama3-8b}" --rates "${RATES:-8,24}" \
    $(command -v py-spy >/dev/null && echo --py-spy) --json "$out/gpu_serve.json" 2>&1 \
    | tr '\r' '\n' | grep -v "capturing\|Writing model\|INFO:\|it/s\]\|s/it\]\|^ *$" \
    | tee "$out/gpu_serve.log"
  serve=${PIPESTATUS[0]}
fi
echo "gpu tests exit $tests, kernel benchmarks exit $kernels, workloads exit $workloads," \
  "A/B exit $ab, step gaps exit $gaps, serve exit $serve"
exit $(( tests || kernels || workloads || ab || gaps || serve ))
