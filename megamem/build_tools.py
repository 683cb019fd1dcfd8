"""One ninja for every C++ extension a megamem process compiles on first use: megamem's CPU kernel and
DeepSpeed's CPU communication op.

torch's extension builder runs whichever `ninja` PATH finds first, and ninja versions
record a build's commands under different hashes. Two of them taking turns on one
build directory (the one installed with megamem into the interpreter's environment,
and a system one, found when the environment is not activated) each see changed
commands and rebuild: DeepSpeed's op took 25 s of both cores at a training start
whenever the other ninja had built it last. Every megamem process therefore puts the
environment's own first, before anything compiles.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def use_environment_ninja() -> None:
    """Put the interpreter's environment's bin directory first on PATH, if megamem's ninja is installed there."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ninja").is_file():
        return
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if entries[0] != str(bin_dir):
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), *(e for e in entries if e and e != str(bin_dir))])
