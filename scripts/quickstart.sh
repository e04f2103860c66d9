#!/usr/bin/env bash
# Set up .venv if needed and run the quickstart campaign (writes runs/zundel-quickstart/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/ionflow run examples/quickstart.yaml "$@"
