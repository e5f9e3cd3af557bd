#!/usr/bin/env bash
# Create .venv and install lvd (and, with --test, the test extras) with pip.
# torch==2.14.1 / torchvision==0.29.1 are pinned; pip takes them from local disk where
# they lie there (uv/poetry would download gigabytes, so pip it is).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=".venv/.lvd-installed${extras}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    .venv/bin/pip install -q --no-cache-dir -e ".${extras}"
    touch "$stamp"
fi
if [[ -n "$extras" ]] && ! .venv/bin/pip show -q dinov2 >/dev/null 2>&1; then
    # The official DINOv2 code (April 2023) for tests/pretrain/test_dinov2_parity.py, without
    # its pins (torch 2.0, xformers, cuml): the tests import only its pure-torch modules.
    .venv/bin/pip install -q --no-cache-dir --no-deps dinov2==0.0.1.dev2
fi
