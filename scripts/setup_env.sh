#!/usr/bin/env bash
# Create (once) a virtual environment in $VENV (default .venv) with medseg-dpl installed editable.
# On a machine without an NVIDIA GPU the CPU build of torch is pinned (constraints-cpu.txt);
# with one, pip keeps/gets a CUDA build. Source this file: it exports VENV and PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
CONSTRAINT=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  CONSTRAINT=(-c constraints-cpu.txt)
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "${CONSTRAINT[@]}" -e ".[test]"
export VENV PY="$VENV/bin/python"
