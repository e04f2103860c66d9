#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
IONFLOW_EXTRAS=test,aiida,gpu bash scripts/setup.sh  # aiida: remote dispatch is tested for real; gpu: the cuEquivariance layers (on the CPU here)
bash scripts/install-cp2k.sh  # CP2K for the ase adapter's tests (Debian package)
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q "$@"
