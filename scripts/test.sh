#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), lints with ruff (ruff.toml), and runs the whole test suite on CPU in two
# pytest-xdist workers (one per core of the 2-core CI machine; the expensive runs are shared between them, see
# tests/shared.py), each handed the next test as it finishes one (--maxschedchunk 1: the slow tests come first,
# tests/conftest.py, and a batch of them must not queue behind one worker), then prints the 25 slowest tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/model -x`, `bash scripts/test.sh -m "not slow"`
# (the fast tests only), `-n 0` (one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# one thread a worker (two workers, two cores); a test that needs more threads, or a rank, sets its own
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n 2 --maxschedchunk 1 --durations=25 "$@"
