#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k debias). pytest's exit code is ours,
# so "no tests collected" (exit 5) fails too.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
"$PY" -m pytest -q "$@"
