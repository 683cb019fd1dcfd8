#!/usr/bin/env bash
# Creates .venv and installs megamem into it (editable). Safe to re-run.
# The venv sees system site-packages so that a CUDA torch already installed on a
# GPU machine is kept; torch==2.13.0 (a CPU build) is installed only if no torch
# is importable, and before anything that would pull an unpinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e ".[test]"
