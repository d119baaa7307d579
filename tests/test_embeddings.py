"""Text embeddings: the cache, and (with the real model) that they mean something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.config import EmbeddingSettings
from shared.embeddings import CachedEmbedder, EmbeddingError, SentenceTransformerEmbedder
from tests.fakes import HashingEmbedder


def test_cache_embeds_each_text_once(tmp_path: Path) -> None:
    inner = HashingEmbedder()
    cached = CachedEmbedder(inner, tmp_path)
    first = cached.encode(["red shoe", "blue bag", "red shoe"])
    assert inner.texts_encoded == 2
    again = CachedEmbedder(inner, tmp_path).encode(["blue bag", "green hat"])
    assert inner.texts_encoded == 3
    np.testing.assert_array_equal(first[1], again[0])
    np.testing.assert_array_equal(first[0], first[2])


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingError, match="does not exist"):
        SentenceTransformerEmbedder(EmbeddingSettings(model_path=tmp_path / "absent"))


@pytest.fixture(scope="session")
def real_embedder() -> SentenceTransformerEmbedder:
    """The shipped all-MiniLM-L6-v2, loaded once per test run."""
    return SentenceTransformerEmbedder(EmbeddingSettings())


def test_real_model_embeds_meaning(real_embedder: SentenceTransformerEmbedder) -> None:
    bag, purse, drill = real_embedder.encode(
        ["black leather handbag", "dark brown leather purse", "stainless steel drill bit"]
    )
    assert real_embedder.dimension == 384
    np.testing.assert_allclose(np.linalg.norm(bag), 1.0, rtol=1e-4)
    assert float(bag @ purse) > 0.6
    assert float(bag @ drill) < 0.35
