"""Tokenizers: a built-in byte-level one and any Hugging Face tokenizer.json.

A dataset records its tokenizer's hash; training refuses a tokenizer whose hash
differs, because token ids from another vocabulary train a model on noise.
Tokenizers are named by a spec string ("byte" or a file path) so that worker
processes can rebuild them without pickling.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from megamem.errors import DataError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256. Needs no files."""

    kind = "byte"
    vocab_size = 257
    eod_id = 256
    eod_token = "<|endoftext|>"     # its name where a tokenizer file needs one (megamem export --format hf)
    hash = hashlib.sha256(b"megamem byte tokenizer v1: ids 0-255 are bytes, 256 is end-of-document").hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """How many bytes of text each id stands for (end-of-document: none), for bits per byte."""
        return np.array([1] * 256 + [0], dtype=np.int64)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json; its end-of-document token must exist."""

    kind = "huggingface"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        data = path.read_bytes()
        self.hash = hashlib.sha256(data).hexdigest()
        try:
            self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:
            raise DataError(f"tokenizer {path} is not a valid tokenizer.json ({err}); "
                            f"train one with `megamem train-tokenizer` or use --tokenizer byte") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        found = [(self._tokenizer.token_to_id(token), token) for token in EOD_CANDIDATES
                 if self._tokenizer.token_to_id(token) is not None]
        if not found:
            raise DataError(f"tokenizer {path} has no end-of-document token (looked for {', '.join(EOD_CANDIDATES)}); "
                            f"add one as a special token")
        self.eod_id, self.eod_token = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The same ids as encode, without the character offsets `tokenizers` otherwise computes for every token
        (a fifth of the time), on as many threads as RAYON_NUM_THREADS allows."""
        return [np.asarray(encoding.ids, dtype=np.int64)
                for encoding in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """How many bytes of text each id stands for, for bits per byte: a byte-level token's characters are one
        byte each (GPT-2's byte alphabet); any other token counts its UTF-8 length; special tokens none."""
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        special = {token.content for token in self._tokenizer.get_added_tokens_decoder().values() if token.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in special:
                lengths[index] = len(token) if set(token) <= alphabet else len(token.encode("utf-8"))
        return lengths


def load_tokenizer(spec: str):
    """`byte`, or the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"tokenizer not found: {spec}. Fix: pass --tokenizer byte or the path of a tokenizer.json")
    return HFTokenizer(path)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits, else uint32: half the disk for vocabularies up to 65,536."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def describe(tokenizer) -> dict:
    """What a manifest records about its tokenizer."""
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
            "hash": tokenizer.hash, "path": str(getattr(tokenizer, "path", "")) or None}


def train_bpe(texts, vocab_size: int, output: Path) -> HFTokenizer:
    """Byte-level BPE with <|endoftext|> as id 0 (as GPT-NeoX does), saved to `output`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(output)
    return HFTokenizer(output)
