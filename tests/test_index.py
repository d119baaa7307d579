"""The IVF-PQ index: layout choice, exclusions, and recall against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_service.artifact import load_index_artifact
from retrieval_service.index import MIN_ITEMS_FOR_IVFPQ, VectorIndex, build_index, choose_layout, recall_against_exact
from retrieval_service.vectors import normalise_rows
from shared.config import IndexBuildSettings
from tests.conftest import BuiltArtifacts

# Stated threshold: IVF-PQ shortlist + exact re-scoring must find 95% of the exact top 100.
RECALL_AT_100_THRESHOLD = 0.95


def test_layout_scales_with_catalogue_size() -> None:
    settings = IndexBuildSettings()
    small = choose_layout(MIN_ITEMS_FOR_IVFPQ - 1, 448, settings)
    assert small.kind == "flat"
    medium = choose_layout(10_000, 448, settings)
    large = choose_layout(1_000_000, 448, settings)
    assert medium.kind == large.kind == "ivfpq"
    assert medium.nlist < large.nlist
    assert 448 % medium.pq_m == 0
    assert medium.pq_nbits == 8
    assert choose_layout(2_000, 448, settings).pq_nbits < 8  # too few points to train 256 centroids


def test_recall_at_100_against_exact_search(artifacts: BuiltArtifacts) -> None:
    loaded = load_index_artifact(artifacts.root, nprobe=32)
    assert loaded.index.size == artifacts.index.params["items"]
    queries = loaded.user_vectors[:200].astype(np.float32)
    recall = recall_against_exact(loaded.index, queries, 100)
    assert recall >= RECALL_AT_100_THRESHOLD, f"recall@100 {recall:.3f} below {RECALL_AT_100_THRESHOLD}"
    assert artifacts.index.metrics["recall@100_vs_exact"] >= RECALL_AT_100_THRESHOLD


def test_search_never_returns_excluded_rows_and_fills_n() -> None:
    rng = np.random.default_rng(3)
    vectors = normalise_rows(rng.standard_normal((3000, 32)).astype(np.float32))
    layout = choose_layout(len(vectors), 32, IndexBuildSettings())
    index = VectorIndex(build_index(vectors, layout, seed=1), vectors.astype(np.float16), nprobe=16)
    query = vectors[:1]
    first, _ = index.search(query, 50)
    excluded = first[:25]
    second, scores = index.search(query, 50, excluded)
    assert len(second) == 50
    assert not set(excluded.tolist()) & set(second.tolist())
    assert np.all(np.diff(scores) <= 1e-6)


def test_refine_depth_caps_the_shortlist_and_still_fills_n() -> None:
    rng = np.random.default_rng(5)
    vectors = normalise_rows(rng.standard_normal((3000, 32)).astype(np.float32))
    faiss_index = build_index(vectors, choose_layout(len(vectors), 32, IndexBuildSettings()), seed=1)
    full = VectorIndex(faiss_index, vectors.astype(np.float16), nprobe=16, refine_factor=3)
    capped = VectorIndex(faiss_index, vectors.astype(np.float16), nprobe=16, refine_factor=3, refine_depth=10)
    assert [full.shortlist_size(n) for n in (5, 50)] == [15, 150]
    # factor x min(n, depth), never fewer than n.
    assert [capped.shortlist_size(n) for n in (5, 10, 20, 50)] == [15, 30, 30, 50]
    rows, scores = capped.search(vectors[:1], 50)
    assert len(set(rows.tolist())) == len(rows) == 50
    assert np.all(np.diff(scores) <= 1e-6)
    assert rows[0] == 0  # the query's own item, scored exactly


def test_exclusions_larger_than_catalogue_return_what_is_left() -> None:
    vectors = normalise_rows(np.random.default_rng(4).standard_normal((50, 8)).astype(np.float32))
    index = VectorIndex(
        build_index(vectors, choose_layout(50, 8, IndexBuildSettings()), 1), vectors.astype(np.float16), 4
    )
    rows, _ = index.search(vectors[:1], 10, np.arange(45, dtype=np.int64))
    assert sorted(rows.tolist()) == [45, 46, 47, 48, 49]


def test_mismatched_vectors_are_refused() -> None:
    vectors = normalise_rows(np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32))
    index = build_index(vectors, choose_layout(20, 8, IndexBuildSettings()), 1)
    with pytest.raises(ValueError, match="index holds 20 vectors"):
        VectorIndex(index, vectors[:10].astype(np.float16), 4)
