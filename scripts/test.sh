#!/usr/bin/env bash
# Install bitsmith with the test tools, then run the tests. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long checks on the real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh -r requirements-test.txt
exec .venv/bin/python -m pytest -q "$@"
