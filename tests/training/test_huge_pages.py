"""Entry points put large CPU tensors on huge pages. torch then page-aligns them and advises the kernel to back
them with huge pages, but only when THP_MEM_ALLOC_ENABLE was set before its first allocation; otherwise a
32 MB tensor starts 64 bytes into a page."""
import os
import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "megamem CLI": "from megamem.cli.main import main\ntry:\n    main(['plan', '--help'])\n"
                   "except SystemExit:\n    pass",
    "training rank": "from megamem.training.entry import main\nmain(['--config', 'missing.yaml'])",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_allocate_large_cpu_tensors_on_huge_pages(entry, tmp_path):
    code = ENTRY_POINTS[entry] + "\nimport torch\nprint(torch.empty(2**23).data_ptr() % 4096)"
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "0", result.stdout + result.stderr


def test_a_user_setting_is_kept(tmp_path):
    code = ENTRY_POINTS["megamem CLI"] + "\nimport os\nprint(os.environ['THP_MEM_ALLOC_ENABLE'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, THP_MEM_ALLOC_ENABLE="0"),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "0", result.stdout + result.stderr
