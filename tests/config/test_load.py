"""Loading: merge order, overrides, strictness, provenance in messages, round trip."""
from __future__ import annotations

import pytest
import yaml

from megamem.config import Config, ConfigError, config_to_dict, load_config, save_config
from tests.paths import CONFIGS


@pytest.fixture
def write(tmp_path):
    def write(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a nested mapping."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Every value the file sets is what was loaded, and every key it leaves out has the schema's default."""
    loaded = _leaves(config_to_dict(load_config([path])))
    written = _leaves(yaml.safe_load(path.read_text()))
    defaults = _leaves(config_to_dict(Config()))
    assert set(written) <= set(loaded), set(written) - set(loaded)
    for key, value in loaded.items():
        assert value == written.get(key, defaults[key]), key
    if "memoryformer" in path.name:             # what ships: bf16, the fastest kernel here, paper with 24x tables
        assert (loaded["train.precision"], loaded["model.kernel"], loaded["model.weighting"],
                loaded["optimizer.table_lr_multiplier"]) == ("bf16", "auto", "paper", 24.0)


def test_files_merge_in_order_then_overrides_win(write):
    a = write("a.yaml", "model: {hidden_size: 256, num_heads: 4}\ntrain: {steps: 5}\n")
    b = write("b.yaml", "train: {steps: 7}\n")
    config = load_config([a, b], ["model.num_layers=3", "optimizer.lr=2e-3"])
    assert (config.model.hidden_size, config.model.num_heads, config.train.steps) == (256, 4, 7)
    assert config.model.num_layers == 3 and config.optimizer.lr == 2e-3


def test_exponent_floats_are_numbers(write):
    config = load_config([write("a.yaml", "optimizer: {lr: 3e-3}\nschedule: {min_lr: 1e-4}\n")])
    assert config.optimizer.lr == 0.003 and config.schedule.min_lr == 0.0001


def test_unknown_key_suggests_the_closest(write):
    path = write("typo.yaml", "model:\n  hiden_size: 512\n")
    with pytest.raises(ConfigError,
                       match=r"typo\.yaml: unknown key model\.hiden_size; did you mean model\.hidden_size\?"):
        load_config([path])


def test_unknown_section(write):
    with pytest.raises(ConfigError, match=r"unknown key trian; did you mean train\?"):
        load_config([write("a.yaml", "trian: {steps: 3}\n")])


def test_unknown_override_names_the_flag():
    with pytest.raises(ConfigError,
                       match=r"--set train\.stpes=3: unknown key train\.stpes; did you mean train\.steps\?"):
        load_config([CONFIGS / "cpu-smoke.yaml"], ["train.stpes=3"])


@pytest.mark.parametrize("text, message", [
    ("train: {steps: ten}\n", r"train\.steps must be an integer, got 'ten' \(str\)"),
    ("train: {steps: 2.5}\n", r"train\.steps must be an integer, got 2\.5"),
    ("model: {memory_bias: 1}\n", r"model\.memory_bias must be true or false, got 1"),
    ("model: {weighting: softmax}\n", r"model\.weighting must be 'paper' or 'l1', got 'softmax'"),
    ("optimizer: {lr: fast}\n", r"optimizer\.lr must be a number, got 'fast'"),
    ("optimizer: {betas: 0.9}\n", r"optimizer\.betas must be a list, got 0\.9"),
    ("model: 5\n", r"model must be a mapping, got 5"),
    ("data: {sources: [{path: a, wieght: 2}]}\n",
     r"unknown key data\.sources\[0\]\.wieght; did you mean data\.sources\[0\]\.weight\?"),
])
def test_wrong_types_name_file_key_and_value(write, text, message):
    path = write("bad.yaml", text)
    with pytest.raises(ConfigError, match=rf"bad\.yaml: {message}"):
        load_config([path])


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found: nowhere\.yaml"):
        load_config(["nowhere.yaml"])


def test_invalid_yaml_names_the_line(write):
    with pytest.raises(ConfigError, match=r"broken\.yaml: line 2, column \d+ is not valid YAML"):
        load_config([write("broken.yaml", "model:\n  hidden_size: 512: 3\n")])


def test_top_level_must_be_a_mapping(write):
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_config([write("list.yaml", "- 1\n- 2\n")])


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"--set train\.steps: expected key=value"):
        load_config([CONFIGS / "cpu-smoke.yaml"], ["train.steps"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config([CONFIGS / "memoryformer-tiny.yaml"], ["train.steps=11"])
    save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config([tmp_path / "run" / "config.yaml"]) == config
