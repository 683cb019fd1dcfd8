"""Typed, strictly validated configuration (see schema.py for the tree)."""
from megamem.config.errors import ConfigError
from megamem.config.load import config_from_dict, config_to_dict, load_config, save_config
from megamem.config.schema import Config
from megamem.config.validate import num_chunks, padded_vocab_size, validate, validate_world

__all__ = ["Config", "ConfigError", "config_from_dict", "config_to_dict", "load_config", "num_chunks",
           "padded_vocab_size", "save_config", "validate", "validate_world"]
