"""Train/test splits of a dataset, the same for every method of a run.

``random``: per user, the distinct items they interacted with are shuffled (fixed seed)
and 75% go to train, the rest to test (the stratified split of the Microsoft
Recommenders MovieLens benchmarks). ``temporal``: one global cutoff at the time by which
75% of the events happened; train is the past, test is what each user interacted with
after the cutoff and never before. In both, a user's test items are never in their
train history, and recommendations exclude the train items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from shared.data import Dataset

Protocol = Literal["random", "temporal"]
PROTOCOLS: tuple[Protocol, ...] = ("random", "temporal")
TRAIN_SHARE = 0.75


@dataclass(frozen=True)
class Split:
    protocol: Protocol
    train: Dataset
    # Per user row: the item rows held out for testing (empty for users not evaluated).
    test_items: list[npt.NDArray[np.int32]]
    # The "now" of every test request: just after the last train event, or the cutoff.
    request_time: int

    @property
    def evaluated_users(self) -> npt.NDArray[np.int64]:
        return np.asarray([row for row, items in enumerate(self.test_items) if len(items)], dtype=np.int64)

    def train_at_request(self) -> Dataset:
        """The train part as it stood at the request time: items created later (a film
        released, a product first reviewed after a temporal cutoff) did not exist yet, so
        nothing, not even their text, may point at them. Test interactions on such items
        stay in the test part: no method can recommend them."""
        return self.train.existing_at(self.request_time)

    def train_matrix(self) -> sp.csr_matrix:
        """Binary users x items matrix of the train interactions."""
        return interaction_matrix(self.train)


def interaction_matrix(dataset: Dataset) -> sp.csr_matrix:
    events = dataset.events
    matrix = sp.csr_matrix(
        (np.ones(len(events), dtype=np.float32), (events.user_index, events.item_index)),
        shape=(len(dataset.users), len(dataset.catalog)),
    )
    matrix.data[:] = 1.0  # duplicates were summed
    return matrix


def split(dataset: Dataset, protocol: Protocol, seed: int, train_share: float = TRAIN_SHARE) -> Split:
    if protocol == "random":
        return _random_split(dataset, seed, train_share)
    if protocol == "temporal":
        return _temporal_split(dataset, train_share)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def _random_split(dataset: Dataset, seed: int, train_share: float) -> Split:
    events = dataset.events
    n_items = len(dataset.catalog)
    pair = events.user_index.astype(np.int64) * n_items + events.item_index
    pairs = np.unique(pair)
    users = (pairs // n_items).astype(np.int64)
    rng = np.random.default_rng(seed)
    # Shuffle all pairs, then stable-sort by user: a uniform shuffle within each user.
    order = rng.permutation(len(pairs))
    order = order[np.argsort(users[order], kind="stable")]
    shuffled_users = users[order]
    starts = np.searchsorted(shuffled_users, shuffled_users, side="left")
    counts = np.bincount(shuffled_users, minlength=len(dataset.users))
    position = np.arange(len(order)) - starts
    in_train = position < np.round(train_share * counts[shuffled_users])
    train_pairs = pairs[order[in_train]]
    test_pairs = np.sort(pairs[order[~in_train]])
    train = _with_events(dataset, np.isin(pair, train_pairs))
    return Split(
        protocol="random",
        train=train,
        test_items=_items_per_user(test_pairs, n_items, len(dataset.users)),
        request_time=int(train.events.timestamp.max()) + 1,
    )


def _temporal_split(dataset: Dataset, train_share: float) -> Split:
    events = dataset.events
    n_items = len(dataset.catalog)
    cutoff = int(np.quantile(events.timestamp, train_share))
    past = events.timestamp < cutoff
    pair = events.user_index.astype(np.int64) * n_items + events.item_index
    test_pairs = np.setdiff1d(np.unique(pair[~past]), np.unique(pair[past]))
    return Split(
        protocol="temporal",
        train=_with_events(dataset, past),
        test_items=_items_per_user(test_pairs, n_items, len(dataset.users)),
        request_time=cutoff,
    )


def _with_events(dataset: Dataset, mask: npt.NDArray[np.bool_]) -> Dataset:
    return replace(dataset, events=dataset.events.select(mask))


def _items_per_user(pairs: npt.NDArray[np.int64], n_items: int, n_users: int) -> list[npt.NDArray[np.int32]]:
    users = pairs // n_items
    items = (pairs % n_items).astype(np.int32)
    bounds = np.searchsorted(users, np.arange(n_users + 1))  # pairs are sorted by user
    return [items[bounds[row] : bounds[row + 1]] for row in range(n_users)]


def validation_split(train: Dataset, protocol: Protocol, seed: int) -> Split:
    """The same protocol applied to the train part: for tuning, never touching test."""
    return split(train, protocol, seed + 1)
