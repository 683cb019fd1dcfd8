"""megamem.json: what is written is read back whole, and a marker megamem cannot trust is refused in one line."""
from __future__ import annotations

import dataclasses
import json

import pytest

from megamem.checkpoint.format import (
    FORMAT_VERSION,
    MARKER,
    SHARDED,
    DataPosition,
    FileRecord,
    Layout,
    Marker,
    ShardRecord,
    read_marker,
)
from megamem.errors import MegamemError

MARKED = Marker(kind=SHARDED, step=12, position=DataPosition(24, "ab12"), model={"arch": "memoryformer", "tau": 8},
                layout=Layout(tp=2, pp=2, dp=1, zero_stage=1, table_sharding="column"),
                files={"mp_rank_00_model_states.pt": FileRecord(1234, "00ff")}, world_size=4,
                shards={"blocks.0.attn.q.tables": ShardRecord(2, 1), "embed.weight": ShardRecord(0, 1)},
                optimizer_order=[[["embed.weight"], ["blocks.0.norm1.weight"]], [["head.weight"]]])


def test_a_marker_reads_back_as_written(tmp_path):
    MARKED.write(tmp_path)
    assert read_marker(tmp_path) == MARKED
    assert json.loads((tmp_path / MARKER).read_text())["version"] == FORMAT_VERSION


@pytest.mark.parametrize("change, words", [
    (lambda raw: raw.update(version=FORMAT_VERSION + 1), f"format version {FORMAT_VERSION + 1}; this megamem reads "
                                                         f"version {FORMAT_VERSION} only"),
    (lambda raw: raw.pop("version"), "format version None"),
    (lambda raw: raw.pop("layout"), "lacks or misnames a field ('layout')"),
    (lambda raw: raw["files"]["mp_rank_00_model_states.pt"].pop("sha256"), "lacks or misnames a field"),
])
def test_a_marker_of_another_version_or_shape_is_refused_by_name(tmp_path, change, words):
    raw = dataclasses.asdict(MARKED)
    change(raw)
    (tmp_path / MARKER).write_text(json.dumps(raw))
    with pytest.raises(MegamemError) as refused:
        read_marker(tmp_path)
    message = str(refused.value)
    assert words in message and str(tmp_path / MARKER) in message and "Fix:" in message and "\n" not in message


def test_a_missing_or_unreadable_marker_is_refused_by_name(tmp_path):
    with pytest.raises(MegamemError, match="is not a complete megamem checkpoint"):
        read_marker(tmp_path)
    (tmp_path / MARKER).write_text('{"step": 1')
    with pytest.raises(MegamemError, match="is not JSON"):
        read_marker(tmp_path)


def test_a_layout_describes_what_cuts_the_files():
    assert MARKED.layout.describe() == ("parallel.tp=2, parallel.table_sharding=column, parallel.pp=2, "
                                        "1 data-parallel replica(s), ZeRO 1")
    assert Layout(1, 1, 2, 0, "column").describe() == "parallel.tp=1, 2 data-parallel replica(s), ZeRO 0"
