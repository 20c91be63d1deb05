#!/usr/bin/env bash
# Run the tuili CLI in its own environment, setting it up on first use:
#   scripts/tuili.sh chat            chat with the default model (SmolLM2-135M-Instruct)
#   scripts/tuili.sh generate "Hi"   complete a prompt
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec tuili "${@:-chat}"
