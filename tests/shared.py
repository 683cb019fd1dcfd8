"""Expensive things the tests share (training runs, multi-rank launches), made once per test session.

A test session may run in several pytest-xdist workers, each a process with its
own session fixtures. What is shared lives under the session's common temporary
directory instead: the first worker that needs a thing makes it under a file
lock, and the others wait for it and read it. A failure is not recorded, so each
test that needs the thing tries again and reports its own failure.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


class Shared:
    def __init__(self, tmp_path_factory):
        base = tmp_path_factory.getbasetemp()
        self.root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
        self.root.mkdir(exist_ok=True)

    def once(self, name: str, make: Callable[[Path], dict | None]) -> tuple[Path, dict]:
        """(directory, what `make(directory)` returned) for `name`, made by whichever worker asks first."""
        path, done = self.root / name, self.root / f"{name}.done.json"
        with FileLock(str(self.root / f"{name}.lock")):
            if not done.is_file():
                shutil.rmtree(path, ignore_errors=True)         # what a failed attempt left
                path.mkdir()
                done.write_text(json.dumps(make(path) or {}))
        return path, json.loads(done.read_text())
