#!/usr/bin/env bash
# Create .venv and install ionflow with pinned dependencies (CPU torch from the pinned wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull the multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# IONFLOW_EXTRAS: the extras to install (test.sh adds aiida; the quickstart needs none of them).
.venv/bin/python -m pip install -q -e ".[${IONFLOW_EXTRAS:-test}]"
