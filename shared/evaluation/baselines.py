"""Baselines, each tuned on a validation split carved from train: a weak baseline proves nothing.

Every recommender fits on a train part (a binary users x items matrix, and the events
with their times for the one that needs them) and scores items for a batch of users;
``top_k`` turns scores into lists with the user's train items excluded.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from shared.config import EASE_L2_GRID
from shared.data import Events
from shared.interactions import decayed_counts
from shared.metrics import top_k_metrics

Scores = npt.NDArray[np.float32]
USER_BATCH = 1024
# EASE inverts a dense items x items matrix.
EASE_MAX_ITEMS = 30_000


@dataclass(frozen=True)
class TrainPart:
    matrix: sp.csr_matrix
    # The interactions behind ``matrix`` with their times, and the "now" of the requests:
    # for the time-aware baseline; None where only the matrix is at hand.
    events: Events | None = None
    now: int = 0


class Recommender(Protocol):
    # False: users without train items are answered with all-time popularity (top_k).
    answers_newcomers: bool

    def fit(self, train: TrainPart) -> None: ...

    def scores(self, users: npt.NDArray[np.int64]) -> Scores: ...


class MostPopular:
    answers_newcomers = True

    def fit(self, train: TrainPart) -> None:
        self._counts = np.asarray(train.matrix.sum(axis=0), dtype=np.float32).ravel()

    def scores(self, users: npt.NDArray[np.int64]) -> Scores:
        return np.tile(self._counts, (len(users), 1))


class RecentPopular(MostPopular):
    """Most popular as of the requests' now: interactions decayed with ``half_life_days``
    (None: all time) plus ``prior_weight`` spread by all-time shares. On a time split
    the recent weeks' favourites beat all time's; a temporal evaluation without this
    baseline flatters any method that knows what is recent."""

    def __init__(self, half_life_days: float | None, prior_weight: float = 0.0) -> None:
        self._half_life_days = half_life_days
        self._prior_weight = prior_weight

    def fit(self, train: TrainPart) -> None:
        if train.events is None:
            raise ValueError("RecentPopular needs the train events with their times, not only the matrix")
        n_items = train.matrix.shape[1]
        self._counts = decayed_counts(train.events, n_items, train.now, self._half_life_days, self._prior_weight)


class ItemKNN:
    """Cosine item-item similarity, each item keeping its ``neighbours`` most similar items."""

    answers_newcomers = False

    def __init__(self, neighbours: int, shrink: float = 0.0) -> None:
        self._neighbours = neighbours
        self._shrink = shrink

    def fit(self, train: TrainPart) -> None:
        self._matrix = train.matrix
        columns = train.matrix.tocsc().astype(np.float32)
        norms = np.sqrt(np.asarray(columns.multiply(columns).sum(axis=0)).ravel())
        co_counts = (columns.T @ columns).toarray()
        similarity = co_counts / (np.outer(norms, norms) + self._shrink + 1e-9)
        np.fill_diagonal(similarity, 0.0)
        if self._neighbours < similarity.shape[1]:
            weakest = np.argpartition(-similarity, self._neighbours, axis=1)[:, self._neighbours :]
            np.put_along_axis(similarity, weakest, 0.0, axis=1)
        # Row i holds item i's neighbours; a user scores j by summing sim(i, j) over their items i.
        self._similarity = similarity.astype(np.float32)

    def scores(self, users: npt.NDArray[np.int64]) -> Scores:
        return np.asarray(self._matrix[users] @ self._similarity, dtype=np.float32)


def ease_weights(matrix: sp.csr_matrix, l2: float, max_items: int = EASE_MAX_ITEMS) -> npt.NDArray[np.float32]:
    """EASE's item x item weights B = I - P / diag(P), P = (X'X + l2 I)^-1, zero diagonal
    (Steck, 2019); a user scores item j by summing B[i, j] over their items i."""
    n_items = matrix.shape[1]
    if n_items > max_items:
        raise ValueError(f"EASE needs a dense {n_items}x{n_items} inverse; limit is {max_items} items")
    gram = (matrix.T @ matrix).toarray().astype(np.float64)
    gram[np.diag_indices(n_items)] += l2
    precision = np.linalg.inv(gram)
    weights = precision / -np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return np.asarray(weights, dtype=np.float32)


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019): closed-form item-item weights."""

    answers_newcomers = False

    def __init__(self, l2: float, extra_rows: sp.csr_matrix | None = None) -> None:
        self._l2 = l2
        # Rows fitted on beside the users' (the item model's sessions), never scored.
        self._extra_rows = extra_rows

    def fit(self, train: TrainPart) -> None:
        self._matrix = matrix = train.matrix
        fitted = matrix if self._extra_rows is None else sp.vstack([matrix, self._extra_rows], format="csr")
        self._weights = ease_weights(fitted, self._l2)

    def scores(self, users: npt.NDArray[np.int64]) -> Scores:
        return np.asarray(self._matrix[users] @ self._weights, dtype=np.float32)


class ALS:
    """Implicit-feedback ALS from the `implicit` library (Hu, Koren & Volinsky, 2008)."""

    answers_newcomers = False

    def __init__(self, factors: int, regularization: float, alpha: float, iterations: int = 15, seed: int = 7) -> None:
        self._params = {"factors": factors, "regularization": regularization, "alpha": alpha, "iterations": iterations}
        self._seed = seed

    def fit(self, train: TrainPart) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit parallelises itself and asks for single-threaded BLAS.
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(**self._params, random_state=self._seed, calculate_training_loss=False)
            model.fit(train.matrix, show_progress=False)
        self._users = np.asarray(model.user_factors, dtype=np.float32)
        self._items = np.asarray(model.item_factors, dtype=np.float32)

    def scores(self, users: npt.NDArray[np.int64]) -> Scores:
        return self._users[users] @ self._items.T


def top_k(
    recommender: Recommender, matrix: sp.csr_matrix, users: npt.NDArray[np.int64], k: int
) -> list[npt.NDArray[np.int32]]:
    """Each user's k best items that are not among their train items (``matrix``).

    Users without train items get the most popular items unless the recommender answers
    them itself: a personalised model has nothing to say about them, and a baseline that
    answers at random would be a strawman.
    """
    popularity = np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel()
    history_sizes = np.diff(matrix.indptr)
    lists: list[npt.NDArray[np.int32]] = []
    for start in range(0, len(users), USER_BATCH):
        batch = users[start : start + USER_BATCH]
        scores = recommender.scores(batch).astype(np.float32, copy=True)
        if not recommender.answers_newcomers:
            scores[history_sizes[batch] == 0] = popularity
        seen = matrix[batch].tocoo()
        scores[seen.row, seen.col] = -np.inf
        best = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
        lists.extend(np.take_along_axis(best, order, axis=1).astype(np.int32))
    return lists


@dataclass(frozen=True)
class Baseline:
    name: str
    build: Callable[..., Recommender]
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    # Beyond this catalogue size the method does not fit in memory and is skipped.
    max_items: int | None = None

    def settings(self) -> Iterator[dict[str, Any]]:
        names = list(self.grid)
        for values in itertools.product(*(self.grid[name] for name in names)):
            yield dict(zip(names, values, strict=True))


# Also tunes the ranker's item model (ranking_service/store.py: item_model).
EASE_BASELINE = Baseline("ease", EASE, {"l2": list(EASE_L2_GRID)}, max_items=EASE_MAX_ITEMS)
BASELINES: tuple[Baseline, ...] = (
    Baseline("most-popular", lambda: MostPopular()),
    Baseline(
        "recent-popular",
        RecentPopular,
        {"half_life_days": [1.0, 3.0, 7.0, 14.0, 30.0, 90.0, None], "prior_weight": [0.0, 1000.0]},
    ),
    Baseline("item-knn", ItemKNN, {"neighbours": [5, 10, 20, 50, 100], "shrink": [0.0, 10.0, 50.0]}),
    EASE_BASELINE,
    Baseline(
        "als",
        ALS,
        {"factors": [8, 16, 32, 64], "regularization": [1.0, 10.0, 50.0], "alpha": [0.5, 1.0, 5.0]},
    ),
)


@dataclass(frozen=True)
class Tuned:
    params: dict[str, Any]
    validation_ndcg: float
    trials: list[tuple[dict[str, Any], float]]
    seconds: float


def tune(
    baseline: Baseline,
    train: TrainPart,
    held_out: Sequence[npt.NDArray[np.int32]],
    users: npt.NDArray[np.int64],
    k: int,
) -> Tuned:
    """Grid search on a validation split: the setting with the best NDCG@k wins."""
    started = time.perf_counter()
    trials: list[tuple[dict[str, Any], float]] = []
    for params in baseline.settings():
        recommender = baseline.build(**params)
        recommender.fit(train)
        lists = top_k(recommender, train.matrix, users, k)
        ndcg = top_k_metrics(lists, [held_out[user] for user in users], k, train.matrix.shape[1])[f"ndcg@{k}"]
        trials.append((params, ndcg))
    best_params, best_ndcg = max(trials, key=lambda trial: trial[1])
    return Tuned(best_params, best_ndcg, trials, time.perf_counter() - started)
