"""Collaborative factors, fusion and query vectors."""

from __future__ import annotations

import numpy as np

from retrieval_service.vectors import (
    fit_collaborative,
    fuse,
    interaction_matrix,
    query_vector,
    tune_collaborative,
    user_queries,
)
from shared.config import IndexBuildSettings
from shared.data import Dataset
from shared.interactions import recency_weights


def test_interaction_matrix_weighs_intent(dataset: Dataset) -> None:
    matrix = interaction_matrix(dataset.events, len(dataset.users), len(dataset.catalog))
    assert matrix.shape == (len(dataset.users), len(dataset.catalog))
    assert matrix.nnz > 0
    assert np.all(matrix.data > 0)


def test_als_factors_put_co_interacted_items_close(dataset: Dataset) -> None:
    settings = IndexBuildSettings(als_factors=32, als_iterations=10, als_tuning={"enabled": False})
    factors, tuning = fit_collaborative(dataset.events, len(dataset.users), len(dataset.catalog), settings)
    assert tuning is None
    untouched = np.setdiff1d(np.arange(len(dataset.catalog)), dataset.events.item_index)
    assert np.all(factors.item_factors[untouched] == 0)
    # Items of the same category are bought by the same people: closer on average.
    vectors = factors.item_factors / np.maximum(np.linalg.norm(factors.item_factors, axis=1, keepdims=True), 1e-9)
    categories = dataset.catalog.categories
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(vectors), size=(4000, 2))
    touched = np.isin(pairs, dataset.events.item_index).all(axis=1)
    pairs = pairs[touched]
    cosine = np.sum(vectors[pairs[:, 0]] * vectors[pairs[:, 1]], axis=1)
    same = categories[pairs[:, 0]] == categories[pairs[:, 1]]
    assert cosine[same].mean() > cosine[~same].mean() + 0.1


def test_fused_vectors_keep_factor_magnitudes_and_cold_items() -> None:
    rng = np.random.default_rng(1)
    content = rng.standard_normal((10, 6)).astype(np.float32)
    collaborative = rng.standard_normal((10, 4)).astype(np.float32)
    collaborative[3] = 0  # an item nobody interacted with
    settings = IndexBuildSettings(content_weight=0.5, collaborative_weight=2.0)
    fused = fuse(content, collaborative, settings)
    assert fused.shape == (10, 10)
    np.testing.assert_allclose(np.linalg.norm(fused[:, :6], axis=1), 0.5, rtol=1e-5)
    assert np.all(fused[3, 6:] == 0)
    # The collaborative half is the factors over one global scale: ALS inner products keep their order.
    ratios = np.linalg.norm(fused[:, 6:], axis=1)[collaborative.any(axis=1)] / np.linalg.norm(
        collaborative[collaborative.any(axis=1)], axis=1
    )
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    query = rng.standard_normal(4)
    assert np.array_equal(np.argsort(fused[:, 6:] @ query), np.argsort(collaborative @ query))


def test_queries_are_unit_per_half_times_the_weights() -> None:
    rng = np.random.default_rng(4)
    summed = rng.standard_normal((3, 10)) * np.array([[1e-20], [1.0], [1e20]])
    settings = IndexBuildSettings(content_weight=0.5, collaborative_weight=2.0)
    queries = query_vector(summed, 6, settings)
    np.testing.assert_allclose(np.linalg.norm(queries[:, :6], axis=1), 0.5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(queries[:, 6:], axis=1), 2.0, rtol=1e-5)
    # A query built from a query is the same query (shards send parts, ranking sends the sum back).
    np.testing.assert_allclose(query_vector(queries, 6, settings), queries, rtol=1e-5)


def test_recency_weights_favour_recent_purchases() -> None:
    codes = np.array([0, 2, 0], dtype=np.int8)
    now = 100 * 86_400
    times = np.array([now, now, now - 14 * 86_400])
    weights = recency_weights(codes, times, now, half_life_days=14)
    assert weights[1] > weights[0] > weights[2]
    np.testing.assert_allclose(weights[2], weights[0] / 2)


def test_user_queries_only_for_users_with_history(dataset: Dataset) -> None:
    vectors = np.random.default_rng(2).standard_normal((len(dataset.catalog), 8)).astype(np.float32)
    settings = IndexBuildSettings(als_factors=4)
    queries = user_queries(
        dataset.events, vectors, 4, len(dataset.users), int(dataset.events.timestamp.max()) + 1, settings
    )
    active = np.unique(dataset.events.user_index)
    norms = np.linalg.norm(queries, axis=1)
    np.testing.assert_allclose(norms[active], np.sqrt(2.0), rtol=1e-4)  # two unit halves
    inactive = np.setdiff1d(np.arange(len(dataset.users)), active)
    assert np.all(norms[inactive] == 0)


def test_collaborative_tuning_scores_every_setting_and_keeps_the_best(dataset: Dataset) -> None:
    matrix = interaction_matrix(dataset.events, len(dataset.users), len(dataset.catalog))
    grid = {"factors": [4, 16], "regularization": [1.0, 10.0], "alpha": [1.0], "min_interactions": 1, "recall_at": 20}
    settings = IndexBuildSettings(als_iterations=5, als_tuning=grid)
    tuning = tune_collaborative(matrix, settings)
    assert tuning is not None
    assert len(tuning.trials) == 4
    assert all(0.0 <= trial["recall"] <= 1.0 for trial in tuning.trials)
    assert tuning.recall == max(trial["recall"] for trial in tuning.trials) > 0
    assert (tuning.factors, tuning.regularization) in {(4, 1.0), (4, 10.0), (16, 1.0), (16, 10.0)}
    # The manifest entry names the choice and every trial.
    assert tuning.describe()["factors"] == tuning.factors
    assert len(tuning.describe()["trials"]) == 4


def test_collaborative_tuning_is_skipped_when_off_tiny_or_unused(dataset: Dataset) -> None:
    matrix = interaction_matrix(dataset.events, len(dataset.users), len(dataset.catalog))
    assert tune_collaborative(matrix, IndexBuildSettings(als_tuning={"enabled": False})) is None
    assert tune_collaborative(matrix, IndexBuildSettings(als_tuning={"min_interactions": matrix.nnz + 1})) is None
    assert tune_collaborative(matrix, IndexBuildSettings(collaborative_weight=0.0)) is None
