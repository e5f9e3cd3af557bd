#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Slow tests are excluded; run them with
#   .venv/bin/pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest -m "not slow" "$@"
