"""Build and load the retrieval artifact (``<root>/index/<version>/``).

Files: ``index.faiss`` (IVF-PQ), ``item_ids.npy``, ``item_vectors.npy`` (fused,
float16, for exact re-scoring, history queries and SimilarItems), ``user_ids.npy`` and
``user_vectors.npy`` (query per known user), ``popular_items.npy`` (item rows, most
popular first, for users with no history) and ``popular_ranks.npy`` (their ranks in the
whole catalogue); the candidate sources' tables (attributes, trending, co-visitation,
users' recent items: see :mod:`retrieval_service.source_tables`), whose ``item_stock.npy``
is also the build-time stock that UpsertItems and UpdateStock change in the live copy (see
retrieval_service/updates.py). A sharded build writes one such artifact per shard
(``<root>/index-shard-<i>-of-<n>/<version>/``) holding that shard's items and users.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval_service.index import REFINE_FACTOR, IndexLayout, VectorIndex, build_index, choose_layout
from retrieval_service.shards import shard_artifact_name, shard_assignments
from retrieval_service.source_tables import (
    GlobalTables,
    SourceTables,
    global_tables,
    load_source_tables,
    write_shard_tables,
)
from retrieval_service.tuning import layout_spec, tune_search
from retrieval_service.vectors import fit_collaborative, fuse, user_queries
from shared.artifacts import Artifact, ArtifactError, ArtifactWriter, new_version, open_artifact, set_current
from shared.config import DEFAULT_NPROBE, IndexBuildSettings
from shared.data import Dataset
from shared.embeddings import TextEmbedder
from shared.interactions import decayed_counts
from shared.logs import event

log = logging.getLogger(__name__)

KIND = "vitrine.retrieval-index"
DEFAULT_NAME = "index"


@dataclass(frozen=True)
class IndexTables:
    """The contents of one index artifact (the whole index or one shard), row-aligned."""

    index: faiss.Index
    item_ids: npt.NDArray[np.str_]
    item_vectors: npt.NDArray[np.float16]
    user_ids: npt.NDArray[np.str_]
    user_vectors: npt.NDArray[np.float16]
    popular_rows: npt.NDArray[np.int32]
    popular_ranks: npt.NDArray[np.int32]
    # The candidate sources' tables: (whole-build tables, dataset, popularity, item rows, user rows).
    sources: (
        tuple[GlobalTables, Dataset, npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.int64]] | None
    ) = None


def write_index_artifact(
    root: Path,
    name: str,
    version: str,
    tables: IndexTables,
    params: dict[str, Any],
    metrics: dict[str, Any],
    make_current: bool = True,
) -> Artifact:
    """``params`` must hold what :func:`load_index_artifact` reads: content_dim,
    collaborative_dim, embedding_model, build, shard and shard_count."""
    with ArtifactWriter(root, name, version) as writer:
        faiss.write_index(tables.index, str(writer.path("index.faiss")))
        writer.save_array("item_ids.npy", tables.item_ids)
        writer.save_array("item_vectors.npy", tables.item_vectors)
        writer.save_array("user_ids.npy", tables.user_ids)
        writer.save_array("user_vectors.npy", tables.user_vectors)
        writer.save_array("popular_items.npy", tables.popular_rows)
        writer.save_array("popular_ranks.npy", tables.popular_ranks)
        if tables.sources is not None:
            write_shard_tables(writer, *tables.sources)
        return writer.commit(KIND, params, metrics, make_current=make_current)


def build_index_artifact(
    dataset: Dataset,
    embedder: TextEmbedder,
    root: Path,
    settings: IndexBuildSettings,
    name: str = DEFAULT_NAME,
    cutoff: int | None = None,
    extra_params: dict[str, Any] | None = None,
) -> Artifact:
    """The whole index as one artifact ``<root>/<name>/<version>/``."""
    return build_index_artifacts(dataset, embedder, root, settings, name, cutoff, shards=1, extra_params=extra_params)[
        0
    ]


def build_index_artifacts(
    dataset: Dataset,
    embedder: TextEmbedder,
    root: Path,
    settings: IndexBuildSettings,
    name: str = DEFAULT_NAME,
    cutoff: int | None = None,
    shards: int = 1,
    extra_params: dict[str, Any] | None = None,
) -> list[Artifact]:
    """Embed, factorise, fuse and index; only events before ``cutoff`` are used.

    Vectors, user queries and popularity are computed once over the whole catalogue, then
    split by :func:`shard_of` into ``shards`` artifacts (``shard_artifact_name``) that share
    one version: every shard scores in the same vector space, so their answers merge.
    ``extra_params`` are recorded in every manifest (e.g. the catalogue updates folded in).
    """
    started = time.perf_counter()
    cutoff = cutoff if cutoff is not None else int(dataset.events.timestamp.max()) + 1
    events = dataset.events.before(cutoff)
    catalog = dataset.catalog
    n_items, n_users = len(catalog), len(dataset.users)

    event(log, "embedding item texts", items=n_items, model=embedder.model_id)
    content = embedder.encode(catalog.embedding_texts(), show_progress=True)
    collaborative, tuning = fit_collaborative(events, n_users, n_items, settings)
    fused = fuse(content, collaborative.item_factors, settings)
    stored_vectors = fused.astype(np.float16)
    queries = user_queries(events, stored_vectors.astype(np.float32), content.shape[1], n_users, cutoff, settings)
    has_history = np.linalg.norm(queries, axis=1) > 0

    rng = np.random.default_rng(settings.seed)
    active = np.flatnonzero(has_history)
    n_sample = min(settings.tuning.sample_queries, len(active))
    sample = rng.choice(active, size=n_sample, replace=False) if len(active) else active
    counting = settings.popularity
    popularity = decayed_counts(events, n_items, cutoff, counting.half_life_days, counting.prior_weight)
    popular_rows = np.argsort(-popularity, kind="stable").astype(np.int32)
    # Popular answers are scored by the item's rank in the whole catalogue, so the popular
    # items of several shards merge into the catalogue's order.
    global_rank = np.empty(n_items, dtype=np.int32)
    global_rank[popular_rows] = np.arange(n_items, dtype=np.int32)

    source_tables = global_tables(dataset, events, cutoff, settings)
    item_model = source_tables.item_model_settings
    item_shard = shard_assignments(catalog.item_ids.tolist(), shards)
    user_shard = shard_assignments(dataset.users.user_ids.tolist(), shards)
    version = new_version()
    common: dict[str, Any] = {
        "dataset": dataset.name,
        "cutoff": cutoff,
        "catalogue_items": n_items,
        "events_used": len(events),
        "embedding_model": embedder.model_id,
        "content_dim": int(content.shape[1]),
        "collaborative_dim": int(collaborative.item_factors.shape[1]),
        "build": settings.model_dump(),
        "collaborative_tuning": tuning.describe() if tuning else None,
        # The item_model source's L2 and session gap (tuned at build), None: no item model
        # (too many items) or, for the gap, no sessions (ItemModelSettings.for_label_split).
        "item_model_l2": item_model.l2 if item_model else None,
        "item_model_session_gap_s": item_model.fitted_session_gap_s if item_model else None,
        **(extra_params or {}),
    }
    artifacts = []
    for shard in range(shards):
        item_rows = np.flatnonzero(item_shard == shard)
        if not len(item_rows):
            raise ValueError(f"shard {shard} of {shards} would hold no items; use fewer shards")
        local_row = np.full(n_items, -1, dtype=np.int32)
        local_row[item_rows] = np.arange(len(item_rows), dtype=np.int32)
        shard_popular = popular_rows[item_shard[popular_rows] == shard]
        users = has_history & (user_shard == shard)

        layout = choose_layout(len(item_rows), fused.shape[1], settings)
        event(log, "training index", shard=shard, shards=shards, **layout.describe())
        index = build_index(
            fused[item_rows],
            layout,
            settings.seed,
            settings.train_sample,
            settings.train_iterations,
            opq_iterations=settings.opq_iterations,
        )
        vectors = stored_vectors[item_rows]
        code_bytes = index.sa_code_size() if layout.kind == "ivfpq" else 4 * layout.dimension
        bytes_per_item = code_bytes + 2 * layout.dimension
        params: dict[str, Any] = {
            **common,
            "shard": shard,
            "shard_count": shards,
            "items": len(item_rows),
            "users_with_history": int(users.sum()),
            "layout": layout.describe(),
        }
        metrics: dict[str, Any] = {
            "bytes_per_item_codes_and_vectors": bytes_per_item,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        if len(sample):
            # The autotuner: the smallest nprobe whose served search reaches the target recall.
            tuned = tune_search(
                VectorIndex(index, vectors, DEFAULT_NPROBE),
                queries[sample],
                settings.tuning,
                describe_layout(layout),
                bytes_per_item,
            )
            chosen = tuned.choice.measurement
            params["search"] = {"nprobe": chosen.nprobe, "refine_factor": chosen.refine_factor}
            metrics[f"recall@{settings.tuning.recall_at}_vs_exact"] = chosen.recall
            metrics["recall_nprobe"] = chosen.nprobe
            metrics["recall_refine_factor"] = chosen.refine_factor
            metrics["tuning"] = tuned.describe()
        tables = IndexTables(
            index=index,
            item_ids=catalog.item_ids[item_rows],
            item_vectors=vectors,
            user_ids=dataset.users.user_ids[users],
            user_vectors=queries[users].astype(np.float16),
            popular_rows=local_row[shard_popular],
            popular_ranks=global_rank[shard_popular],
            sources=(source_tables, dataset, popularity, item_rows, np.flatnonzero(users)),
        )
        # Every shard's CURRENT moves only once all shards are written: serving shards
        # never straddle two versions longer than their reload polls take.
        artifact = write_index_artifact(
            root, shard_artifact_name(name, shard, shards), version, tables, params, metrics, make_current=False
        )
        event(log, "index artifact written", version=artifact.version, path=str(artifact.path), **metrics)
        artifacts.append(artifact)
    for artifact in artifacts:
        set_current(root, artifact.name, artifact.version)
    return artifacts


@dataclass(eq=False)
class LoadedIndex:
    """Everything the retrieval service serves from one artifact version.

    Catalogue updates (retrieval_service/updates.py, under its writer lock) grow
    ``item_ids`` and ``stock`` by rebinding them to longer views, add to and remove from
    ``item_row``, and set ``stock`` values in place; nothing else changes after loading.
    A reader takes each attribute once per use: a row the index returns is always
    within the ``item_ids`` and ``stock`` read after the search.
    """

    version: str
    index: VectorIndex
    item_ids: npt.NDArray[np.str_]
    item_row: dict[str, int]
    user_row: dict[str, int]
    user_vectors: npt.NDArray[np.float16]
    popular_rows: npt.NDArray[np.int32]
    # Rank of each popular row in the whole catalogue's popularity order (see the build).
    popular_ranks: npt.NDArray[np.int32]
    content_dim: int
    collaborative_dim: int
    embedding_model: str
    build: IndexBuildSettings
    shard: int
    shard_count: int
    # Current stock per item row (UpdateStock and UpsertItems change it at once): the one
    # accessor every reader of stock uses.
    stock: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Rows 0..base_items-1 came from the artifact; later rows were upserted while serving.
    base_items: int = 0
    # Attributes, trending, co-visitation and users' recent items (empty for older artifacts).
    tables: SourceTables | None = None

    @property
    def sources(self) -> SourceTables:
        if self.tables is None:
            raise ValueError("this index was loaded without its source tables")
        return self.tables


def describe_layout(layout: IndexLayout) -> str:
    """The served layout: IVF-PQ (maybe rotated) re-scored from the float16 vectors."""
    return "Flat" if layout.kind == "flat" else layout_spec(layout).label


def tuned_search(params: dict[str, Any]) -> tuple[int, int]:
    """nprobe and shortlist factor the build's autotuner chose (defaults for older artifacts)."""
    search = params.get("search")
    search = search if isinstance(search, dict) else {}
    return int(search.get("nprobe", DEFAULT_NPROBE)), int(search.get("refine_factor", REFINE_FACTOR))


def load_index_artifact(
    root: Path,
    nprobe: int | None = None,
    name: str = DEFAULT_NAME,
    version: str | None = None,
    refine_factor: int | None = None,
    max_rescored_rows: int | None = None,
) -> LoadedIndex:
    """``nprobe`` / ``refine_factor`` None: the values the build's autotuner recorded in the
    manifest. ``max_rescored_rows``: see :class:`VectorIndex` (None: the shortlist grows with n)."""
    artifact = open_artifact(root, name, KIND, version)
    params = artifact.params
    tuned_nprobe, tuned_factor = tuned_search(params)
    nprobe = nprobe if nprobe is not None else tuned_nprobe
    refine_factor = refine_factor if refine_factor is not None else tuned_factor
    index = faiss.read_index(str(artifact.file("index.faiss")))
    item_ids = artifact.load_array("item_ids.npy")
    vectors = artifact.load_array("item_vectors.npy")
    user_ids = artifact.load_array("user_ids.npy")
    user_vectors = artifact.load_array("user_vectors.npy")
    if len(item_ids) != index.ntotal or len(user_ids) != len(user_vectors):
        raise ArtifactError(f"{artifact.path}: item/user tables do not match the index")
    popular_rows = artifact.load_array("popular_items.npy")
    # Versions built before sharding have no ranks file: their popular order is the catalogue's.
    popular_ranks = (
        artifact.load_array("popular_ranks.npy")
        if "popular_ranks.npy" in artifact.manifest["files"]
        else np.arange(len(popular_rows), dtype=np.int32)
    )
    if len(popular_ranks) != len(popular_rows):
        raise ArtifactError(f"{artifact.path}: popular_ranks.npy does not match popular_items.npy")
    # Versions built before catalogue updates record no stock: every item counts as in stock.
    stock = (
        artifact.load_array("item_stock.npy").astype(np.int64)
        if "item_stock.npy" in artifact.manifest["files"]
        else np.ones(len(item_ids), dtype=np.int64)
    )
    if len(stock) != len(item_ids):
        raise ArtifactError(f"{artifact.path}: item_stock.npy does not match item_ids.npy")
    loaded = LoadedIndex(
        version=artifact.version,
        index=VectorIndex(index, vectors, nprobe, refine_factor, max_rescored_rows),
        item_ids=item_ids,
        item_row={item_id: row for row, item_id in enumerate(item_ids.tolist())},
        user_row={user_id: row for row, user_id in enumerate(user_ids.tolist())},
        user_vectors=user_vectors,
        popular_rows=popular_rows,
        popular_ranks=popular_ranks,
        content_dim=int(params["content_dim"]),
        collaborative_dim=int(params["collaborative_dim"]),
        embedding_model=str(params["embedding_model"]),
        build=IndexBuildSettings.model_validate(params["build"]),
        shard=int(params.get("shard", 0)),
        shard_count=int(params.get("shard_count", 1)),
        stock=stock,
        base_items=len(item_ids),
        tables=load_source_tables(artifact, len(item_ids), len(user_ids)),
    )
    event(
        log,
        "index artifact loaded",
        version=artifact.version,
        items=len(item_ids),
        nprobe=nprobe,
        refine_factor=refine_factor,
        shard=loaded.shard,
        shard_count=loaded.shard_count,
    )
    return loaded
