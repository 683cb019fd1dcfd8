"""Exact deduplication: a document whose normalized text was seen before is dropped.

Normalized: Unicode NFC, every run of whitespace one space, none at either end;
case and punctuation are kept, so only copies that differ in layout meet. A
document's key is the 16-byte BLAKE2b digest of that text, computed piece by
piece as it streams (a whitespace run that spans two pieces is one space, as in
the whole text); at 16 bytes, a billion documents collide with odds near 1e-21.
The first occurrence in corpus order is kept, so the same documents go whatever
the number of tasks (the merge decides, over every task's digests in order).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

DIGEST_BYTES = 16
MODES = ("none", "exact")
_WORDS = re.compile(r"\S+")


class DocumentDigest:
    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=DIGEST_BYTES)
        self._space = False             # whitespace since the last word: one space before the next
        self._started = False

    def update(self, text: str) -> None:
        text = unicodedata.normalize("NFC", text)
        position = 0
        for match in _WORDS.finditer(text):
            if match.start() > position:
                self._space = True
            if self._space and self._started:
                self._hash.update(b" ")
            self._hash.update(match.group().encode("utf-8"))
            self._started, self._space, position = True, False, match.end()
        if position < len(text):
            self._space = True

    def digest(self) -> bytes:
        return self._hash.digest()


def first_occurrences(digests: np.ndarray) -> np.ndarray:
    """For digests [n, DIGEST_BYTES] (uint8) in corpus order: True where a digest appears for the first time."""
    keep = np.zeros(len(digests), dtype=bool)
    if len(digests):
        keys = np.ascontiguousarray(digests).view(f"V{DIGEST_BYTES}").ravel()
        _, first = np.unique(keys, return_index=True)
        keep[first] = True
    return keep
