#!/usr/bin/env bash
# Create .venv (if absent) and install bitsmith with its pinned dependencies and data wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt "$@"
.venv/bin/python -m pip install -q --no-deps -r requirements-data.txt
.venv/bin/python -m pip install -q --no-deps -e .
