"""A cheap synthetic catalogue of the served fused dimension, with users and events.

Content half (``content_dim``, unit length, like MiniLM embeddings): each item sits near
the centre of its fine cluster (sub-category), clusters near the centre of one of a few
categories; item noise is mostly low rank (real text embeddings have a decaying
spectrum) plus a little isotropic noise, so an item's cosine to its cluster centre is
~0.75. Collaborative half (``collaborative_dim``): an ALS-like factor whose direction
follows the cluster's taste and whose norm is log-normal (broadly liked items are
longer); cold items (``cold_share``) have a zero half. The fused vectors come from
:func:`retrieval_service.vectors.fuse`, as the build makes them.

Queries are history queries: ten items of one user, mostly from one cluster, weighted
and turned into a query by :func:`retrieval_service.vectors.history_query`, as the
server does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from retrieval_service.vectors import fuse, history_query, normalise_rows
from shared.config import BenchSettings, IndexBuildSettings
from shared.data import CART, PURCHASE, VIEW, Catalog, Dataset, Events, Users

CATEGORIES = 24
BRANDS = 400
LOW_RANK = 48
HISTORY_ITEMS = 10
# Share of a query's / user's items that come from the user's own cluster.
HOME_SHARE = 0.7
CHUNK = 100_000
DAYS = 60
START_TIME = 1_700_000_000


@dataclass(frozen=True)
class SyntheticCatalogue:
    content: npt.NDArray[np.float32]  # (n, content_dim), unit rows
    collaborative: npt.NDArray[np.float32]  # (n, collaborative_dim), zero rows for cold items
    cluster: npt.NDArray[np.int32]  # (n,)
    cluster_category: npt.NDArray[np.int32]  # (clusters,)

    def __len__(self) -> int:
        return len(self.cluster)

    @property
    def content_dim(self) -> int:
        return int(self.content.shape[1])

    def fused(self, settings: IndexBuildSettings) -> npt.NDArray[np.float32]:
        return fuse(self.content, self.collaborative, settings)

    def cluster_members(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Item rows sorted by cluster, and where each cluster starts in that order."""
        order = np.argsort(self.cluster, kind="stable").astype(np.int64)
        starts = np.searchsorted(self.cluster[order], np.arange(int(self.cluster.max()) + 2)).astype(np.int64)
        return order, starts


def _unit(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    unit: npt.NDArray[np.float32] = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit


def make_catalogue(settings: BenchSettings, seed: int) -> SyntheticCatalogue:
    rng = np.random.default_rng(seed)
    n, cd, fd = settings.items, settings.content_dim, settings.collaborative_dim
    clusters = min(settings.clusters, max(2, n // 20))
    categories = normalise_rows(rng.standard_normal((CATEGORIES, cd)))
    cluster_category = rng.integers(0, CATEGORIES, clusters).astype(np.int32)
    centres = normalise_rows(categories[cluster_category] + 0.9 * rng.standard_normal((clusters, cd)) / np.sqrt(cd))
    # Co-purchase tastes follow categories more than sub-categories (a low-rank factor space).
    category_tastes = rng.standard_normal((CATEGORIES, fd)).astype(np.float32)
    tastes = category_tastes[cluster_category] + 0.6 * rng.standard_normal((clusters, fd)).astype(np.float32)
    # Cluster sizes are skewed, as categories of a real shop are.
    sizes = rng.zipf(1.3, clusters).astype(np.float64)
    cluster = rng.choice(clusters, size=n, p=np.minimum(sizes, 1000) / np.minimum(sizes, 1000).sum()).astype(np.int32)
    basis = (rng.standard_normal((LOW_RANK, cd)) * np.linspace(1.6, 0.4, LOW_RANK)[:, None]).astype(np.float32)
    basis *= 0.8 / np.sqrt(float((basis**2).sum() / LOW_RANK))
    content = np.empty((n, cd), dtype=np.float32)
    collaborative = np.empty((n, fd), dtype=np.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        rows = cluster[start:stop]
        low = rng.standard_normal((stop - start, LOW_RANK), dtype=np.float32) @ basis
        iso = rng.standard_normal((stop - start, cd), dtype=np.float32) * np.float32(0.35 / np.sqrt(cd))
        content[start:stop] = _unit(centres[rows] + low + iso)
        direction = _unit(tastes[rows] + 0.8 * rng.standard_normal((stop - start, fd), dtype=np.float32))
        norms = rng.lognormal(0.0, 0.4, stop - start).astype(np.float32)
        collaborative[start:stop] = direction * norms[:, None]
    collaborative[rng.random(n) < settings.cold_share] = 0.0
    return SyntheticCatalogue(content, collaborative, cluster, cluster_category)


def _history_rows(
    rng: np.random.Generator, order: npt.NDArray[np.int64], starts: npt.NDArray[np.int64], n_items: int, size: int
) -> npt.NDArray[np.int64]:
    """``size`` item rows: HOME_SHARE from one (non-empty) cluster, the rest anywhere."""
    while True:
        home = int(rng.integers(0, len(starts) - 1))
        begin, end = int(starts[home]), int(starts[home + 1])
        if end > begin:
            break
    own = round(size * HOME_SHARE)
    rows = np.concatenate([order[rng.integers(begin, end, own)], rng.integers(0, n_items, size - own)])
    return rows.astype(np.int64)


def history_queries(
    catalogue: SyntheticCatalogue,
    fused: npt.NDArray[np.float32],
    count: int,
    settings: IndexBuildSettings,
    seed: int,
) -> npt.NDArray[np.float32]:
    """``count`` query vectors built like the server builds history queries."""
    rng = np.random.default_rng(seed)
    order, starts = catalogue.cluster_members()
    queries = []
    for _ in range(count):
        rows = _history_rows(rng, order, starts, len(catalogue), HISTORY_ITEMS)
        weights = rng.random(HISTORY_ITEMS).astype(np.float32) + 0.1
        queries.append(history_query(fused, rows, weights, catalogue.content_dim, settings)[0])
    return np.ascontiguousarray(np.vstack(queries), dtype=np.float32)


def make_dataset(catalogue: SyntheticCatalogue, settings: BenchSettings, seed: int) -> Dataset:
    """Item table and users with event histories around the catalogue's clusters."""
    rng = np.random.default_rng(seed + 1)
    n = len(catalogue)
    digits = len(str(n))
    item_ids = np.char.add("SKU-", np.char.zfill(np.arange(n).astype(str), digits))
    brand_of_cluster = rng.integers(0, BRANDS, int(catalogue.cluster.max()) + 1)
    brands = np.char.add("Brand ", brand_of_cluster[catalogue.cluster].astype(str))
    categories = np.char.add("Category ", catalogue.cluster_category[catalogue.cluster].astype(str))
    titles = np.char.add("Item ", np.arange(n).astype(str))
    catalog = Catalog(
        item_ids=item_ids,
        titles=titles,
        descriptions=np.full(n, "", dtype="<U1"),
        brands=brands,
        categories=categories,
        prices=np.round(rng.lognormal(3.5, 0.8, n), 2).astype(np.float64),
        stock=np.where(rng.random(n) < 0.05, 0, rng.integers(1, 100, n)).astype(np.int64),
        created_at=(START_TIME - rng.integers(0, 400 * 86_400, n)).astype(np.int64),
    )
    n_users = settings.users
    users = Users(
        user_ids=np.char.add("U-", np.char.zfill(np.arange(n_users).astype(str), len(str(n_users)))),
        created_at=np.full(n_users, START_TIME - 400 * 86_400, dtype=np.int64),
    )
    order, starts = catalogue.cluster_members()
    per_user = settings.events_per_user
    item_index = np.concatenate([_history_rows(rng, order, starts, n, per_user) for _ in range(n_users)]).astype(
        np.int32
    )
    user_index = np.repeat(np.arange(n_users, dtype=np.int32), per_user)
    timestamp = START_TIME + rng.integers(0, DAYS * 86_400, len(item_index)).astype(np.int64)
    code = rng.choice([VIEW, CART, PURCHASE], size=len(item_index), p=[0.85, 0.1, 0.05]).astype(np.int8)
    by_time = np.argsort(timestamp, kind="stable")
    events = Events(
        user_index=user_index[by_time],
        item_index=item_index[by_time],
        event_code=code[by_time],
        timestamp=timestamp[by_time],
        device=np.full(len(by_time), "web"),
        session_id=np.full(len(by_time), "s"),
    )
    return Dataset(name="synthetic-bench", catalog=catalog, users=users, events=events)
