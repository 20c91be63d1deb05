#!/usr/bin/env bash
# Run the test suite (CPU tests; GPU tests skip themselves without a GPU), setting up first.
# TUILI_TEST_WORKERS=1 runs the modules one after another.
set -euo pipefail
TUILI_EXTRAS=test source "$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
# Two workers (a test module each at a time): the CPU machines here have two cores.
exec python -m pytest -n "${TUILI_TEST_WORKERS:-2}" --dist loadfile "$@"
