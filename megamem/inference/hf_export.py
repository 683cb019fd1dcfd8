"""A trained model as a Hugging Face model directory, loadable by transformers without megamem.

The directory holds config.json (naming the modeling file through auto_map, so
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) finds it),
model.safetensors (fp32; the vocabulary cut to the tokenizer's, a tied head
stored as a table of its own), modeling_megamem.py, and the tokenizer: a run's
tokenizer.json as it is, or for the byte tokenizer one that gives the same ids
(a byte-level BPE with no merges). Writing it needs no transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

from megamem.checkpoint.read import VOCAB_PARAMETERS
from megamem.config.schema import Config
from megamem.data_tools.tokenizer import ByteTokenizer, load_tokenizer
from megamem.durable import atomic_write
from megamem.errors import MegamemError
from megamem.inference.load import TrainedModel, load_trained

MODELING_FILE = Path(__file__).with_name("modeling_megamem.py")


def export_hf(path: str | Path, output: Path) -> TrainedModel:
    from safetensors.torch import save

    if output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file():
        raise MegamemError(f"{output} exists and is not a Hugging Face model directory. Fix: pass a new or empty "
                           f"--output directory")
    trained = load_trained(path)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(trained.config.data.tokenizer)
    vocab, eod = trained.config.model.vocab_size, tokenizer.eod_token
    weights = {name: (tensor[:vocab] if name in VOCAB_PARAMETERS else tensor).detach().cpu().clone()
               .contiguous() for name, tensor in trained.model.state_dict().items()}
    json_files = {"config.json": hf_config(trained.config, tokenizer.eod_id),
                  "generation_config.json": {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id,
                                             "pad_token_id": tokenizer.eod_id,
                                             "max_length": trained.config.model.seq_len},
                  "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod,
                                            "eos_token": eod, "pad_token": eod,
                                            "model_max_length": trained.config.model.seq_len,
                                            "clean_up_tokenization_spaces": False}}
    files = {"model.safetensors": save(weights, metadata={"format": "pt"}),
             **{name: json.dumps(content, indent=2, ensure_ascii=False).encode() for name, content in
                json_files.items()},
             "tokenizer.json": json.dumps(byte_tokenizer_json(), ensure_ascii=False).encode()
             if isinstance(tokenizer, ByteTokenizer) else tokenizer.path.read_bytes(),
             MODELING_FILE.name: MODELING_FILE.read_bytes()}
    for name, data in files.items():
        atomic_write(output / name, data)
    return trained


def hf_config(config: Config, eod_id: int) -> dict:
    """config.json: transformers' names for the sizes, megamem's for the rest."""
    model = config.model
    return {"model_type": "megamem", "architectures": ["MegamemForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_megamem.MegamemConfig",
                         "AutoModelForCausalLM": "modeling_megamem.MegamemForCausalLM"},
            "arch": model.arch, "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
            "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
            "max_position_embeddings": model.seq_len, "tau": model.tau, "expanding_bits": model.expanding_bits,
            "hash_temperature": model.temperature, "weighting": model.weighting, "memory_bias": model.memory_bias,
            "memory_block_gelu": model.memory_block_gelu, "norm1": model.norm1, "norm2": model.norm2,
            "norm3": model.norm3, "final_norm": model.final_norm, "norm_eps": model.norm_eps,
            "rotary_fraction": model.rotary_fraction, "rotary_base": model.rotary_base,
            "ffn_multiplier": model.ffn_multiplier, "tie_word_embeddings": False, "use_cache": True,
            "bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": eod_id, "dtype": "float32"}


def byte_level_alphabet() -> list[str]:
    """The character GPT-2's byte-level pre-tokenizer writes for each byte 0..255: printable Latin-1 bytes stand
    for themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def byte_tokenizer_json() -> dict:
    """megamem's byte tokenizer as a tokenizer.json: each byte's character is a token whose id is the byte, and
    with no merges every byte stays a token of its own; end-of-document is id 256."""
    vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
    eod = ByteTokenizer.eod_id
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": eod, "content": ByteTokenizer.eod_token, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}
