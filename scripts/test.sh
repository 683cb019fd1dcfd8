#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), lints with ruff (ruff.toml), and runs the whole test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/model -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
