"""megamem.build_tools: every megamem process compiles with its environment's ninja, whatever PATH it was given."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamem.build_tools import use_environment_ninja
from tests.paths import REPO

ENVIRONMENT_NINJA = Path(sys.executable).parent / "ninja"


@pytest.mark.skipif(not ENVIRONMENT_NINJA.is_file(), reason="needs ninja installed beside this interpreter")
def test_a_megamem_process_finds_the_environments_ninja_first():
    """Started with the system's directories first on PATH (an environment used without activating it)."""
    path = os.pathsep.join(["/usr/bin", "/bin", str(ENVIRONMENT_NINJA.parent)])
    found = subprocess.run([sys.executable, "-c", "import shutil, megamem; print(shutil.which('ninja'))"], cwd=REPO,
                           env=dict(os.environ, PATH=path), capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(ENVIRONMENT_NINJA)


def test_path_keeps_one_entry_for_the_environment(monkeypatch, tmp_path):
    (tmp_path / "ninja").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(tmp_path), "/bin"]))
    use_environment_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(tmp_path), "/usr/bin", "/bin"]
    (tmp_path / "ninja").unlink()                           # no ninja of its own: PATH is left as it is
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_environment_ninja()
    assert os.environ["PATH"] == "/usr/bin:/bin"
