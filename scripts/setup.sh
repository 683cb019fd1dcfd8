#!/usr/bin/env bash
# Creates .venv and installs megamem into it (editable). Safe to re-run.
# The venv sees system site-packages so that a CUDA torch already installed on a
# GPU machine is kept; torch==2.13.0 (a CPU build) is installed only if no torch
# is importable. Every later install is constrained to the torch in place, so no
# dependency can replace it with a multi-GB download.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
constraints=.venv/torch-constraint.txt
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
.venv/bin/python -c "import deepspeed" >/dev/null 2>&1 || pip install -c "$constraints" --no-build-isolation deepspeed
pip install -c "$constraints" -e ".[test]"
