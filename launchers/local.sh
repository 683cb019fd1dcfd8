#!/usr/bin/env bash
# N training ranks on this machine, started and watched by megamem train (gloo on CPU).
#   launchers/local.sh N CONFIG [CONFIG ...] [--set key=value ...] [--resume auto|none|PATH]
# Same as `megamem train CONFIG ... --nproc N`.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [CONFIG ...] [--set key=value ...]" >&2
  exit 2
fi
nproc=$1
shift
exec megamem train "$@" --nproc "$nproc"
