#!/usr/bin/env bash
# The README's main command: set up the environment, then run the end-to-end demo
# (phantom -> check/prep -> split -> train supervised/FixMatch/DebiasPL -> eval -> tables, plots).
# Extra arguments go to `medseg-dpl demo` (e.g. scripts/demo.sh --quick).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
"$VENV/bin/medseg-dpl" demo "$@"
