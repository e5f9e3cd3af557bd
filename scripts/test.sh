#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Slow tests are excluded; run them with
#   .venv/bin/pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Fashion-MNIST (real product photos on flat backgrounds) is test data for dedup and
# learning checks; Debian ships it. Install it when missing and we may (root + apt).
if [[ ! -d /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null \
        || echo "warning: could not install dataset-fashion-mnist; tests that need it will fail" >&2
fi
# Debian's Chromium drives the Prefect UI in tests/ui (browser tests; they fail without it).
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }) >/dev/null \
        || echo "warning: could not install chromium; the Prefect UI browser tests will fail" >&2
fi
# Lint and format first: seconds, and a failure names the file and line.
.venv/bin/ruff check lvd tests benchmarks scripts infra
.venv/bin/ruff format --check lvd tests benchmarks scripts infra
export RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
# Two pytest workers (LVD_TEST_WORKERS, 0 for one process): most tests wait on process starts
# (torch in each rank, Ray workers, Prefect), so two share 2 cores well. A module stays on one worker.
exec .venv/bin/python -m pytest -m "not slow" -n "${LVD_TEST_WORKERS:-2}" --dist loadscope --durations=25 "$@"
