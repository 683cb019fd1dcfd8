"""The shape of the code: which parts may import which, where DeepSpeed's internals may be named, how long a file
may grow. Read from the source with ast, so a violation fails here however rarely its code runs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.paths import REPO

# setup.py's package_dir: the folder of each top-level part of the megamem namespace
FOLDERS = {"megamem": REPO / "megamem", "megamem.kernels": REPO / "kernels", "megamem.parallel": REPO / "parallel",
           "megamem.data_tools": REPO / "data_tools"}
SHIPPED = [REPO / name for name in ("megamem", "kernels", "parallel", "data_tools", "launchers", "benchmarks",
                                    "scripts")]

# attributes of DeepSpeed's live engine, optimizer and parameters that it does not document as its interface
DEEPSPEED_RUNTIME = {"checkpoint_engine", "_lazy_init_hp_params_optimizer_state", "fp32_partitioned_groups_flat",
                     "global_steps", "global_samples", "clip_fp32_gradients", "_global_grad_norm", "_grid",
                     "ds_shape", "ds_numel", "ds_id", "slice_group", "dp_group", "pp_group"}
# keys of DeepSpeed's checkpoint files
DEEPSPEED_FILES = {"param_slice_mappings", "single_partition_of_fp32_groups", "base_optimizer_state", "fp32_groups",
                   "param_shapes", "optimizer_state_dict"}
RUNTIME_HOME = REPO / "megamem/training/engine.py"
FILES_HOME = REPO / "megamem/checkpoint/read.py"

# (importer prefix, imported prefix): the importer's modules may not import those modules, directly or not
FORBIDDEN = [("megamem.inference", "megamem.training"), ("megamem.checkpoint", "megamem.training"),
             ("megamem.model", "megamem.training"), ("megamem.model", "megamem.parallel"),
             ("megamem.kernels", "megamem.training"), ("megamem.data_tools", "megamem.training")]


def module_name(path: Path) -> str:
    for package, folder in FOLDERS.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join([package, *(p for p in parts if p != "__init__")])
    raise ValueError(path)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for folder in FOLDERS.values() for path in folder.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every megamem module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("megamem.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: {imported for imported in imports_of(path) if imported in modules} for name, path in modules.items()}


def chain(graph: dict[str, set[str]], start: str, target: str) -> list[str] | None:
    """The import path from `start` to `target`, if there is one."""
    parents, todo = {start: None}, [start]
    while todo:
        current = todo.pop(0)
        if current == target:
            path = [current]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            return path[::-1]
        for imported in sorted(graph[current]):
            if imported not in parents:
                parents[imported] = current
                todo.append(imported)
    return None


def test_the_graph_is_read_from_every_part(graph):
    assert {"megamem.inference.load", "megamem.checkpoint.read", "megamem.training.engine", "megamem.kernels.reference",
            "megamem.parallel.sharding", "megamem.data_tools.loader", "megamem.model.memory_layer"} <= set(graph)
    assert "megamem.checkpoint.read" in graph["megamem.inference.load"]


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}-not-{b}" for a, b in FORBIDDEN])
def test_parts_import_only_what_they_may(graph, importer, imported):
    """Inference reads checkpoints and builds models without training code; the model is plain PyTorch."""
    bad = []
    for start in sorted(name for name in graph if name == importer or name.startswith(importer + ".")):
        for target in sorted(name for name in graph if name == imported or name.startswith(imported + ".")):
            path = chain(graph, start, target)
            if path is not None:
                bad.append(" -> ".join(path))
    assert not bad, bad[:5]


def names_in(path: Path) -> set[str]:
    """Attribute names and string constants of a file: where code reads a field, by `.name` or by a key."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def shipped_files() -> list[Path]:
    return sorted(path for folder in SHIPPED for path in folder.rglob("*.py"))


@pytest.mark.parametrize(("names", "home"), [(DEEPSPEED_RUNTIME, RUNTIME_HOME), (DEEPSPEED_FILES, FILES_HOME)],
                         ids=["runtime-in-training.engine", "files-in-checkpoint.read"])
def test_deepspeed_internals_are_named_in_one_module(names, home):
    """A DeepSpeed upgrade is checked in one place for its objects and one for its files."""
    assert names & names_in(home)
    elsewhere = {str(path.relative_to(REPO)): sorted(names & names_in(path))
                 for path in shipped_files() if path != home and names & names_in(path)}
    assert not elsewhere, elsewhere


def test_no_file_outside_tests_is_over_400_lines():
    long = {str(path.relative_to(REPO)): n for path in shipped_files()
            if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
