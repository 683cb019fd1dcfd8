#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), lints with ruff (ruff.toml), and runs the whole test suite on CPU in two
# pytest-xdist workers (one per core of the 2-core CI machine; the expensive runs are shared between them, see
# tests/shared.py), then prints the 25 slowest tests. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh tests/model -x`, `bash scripts/test.sh -m "not slow"` (the fast tests only), `-n 0` (one
# process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n 2 --durations=25 "$@"
