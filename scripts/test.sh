#!/usr/bin/env bash
# Run the test suite (CPU tests; GPU tests skip themselves without a GPU), setting up first.
set -euo pipefail
TUILI_EXTRAS=test source "$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
exec python -m pytest "$@"
