#!/usr/bin/env bash
# Run the tuili CLI in its own environment, setting it up on first use:
#   scripts/tuili.sh                 serve the default model (SmolLM2-135M-Instruct) on :8000
#   scripts/tuili.sh chat            chat with it in the terminal
#   scripts/tuili.sh generate "Hi"   complete a prompt
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec tuili "${@:-serve}"
