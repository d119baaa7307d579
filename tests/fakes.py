"""Test doubles that are real implementations of small protocols (no mocks)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from retrieval_service.vectors import normalise_rows
from shared.embeddings import Vectors

_WORD = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Deterministic bag-of-words embedder: texts sharing words get similar vectors.

    Implements :class:`shared.embeddings.TextEmbedder` without the 6-8 s import of
    sentence-transformers, for tests about plumbing rather than meaning.
    """

    def __init__(self, dimension: int = 64) -> None:
        self._dimension = dimension
        self.calls = 0
        self.texts_encoded = 0

    @property
    def model_id(self) -> str:
        return f"hashing-bow:{self._dimension}"

    @property
    def dimension(self) -> int:
        return self._dimension

    def _word_vector(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self._dimension)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> Vectors:
        self.calls += 1
        self.texts_encoded += len(texts)
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[row] += self._word_vector(word)
        return normalise_rows(out)
