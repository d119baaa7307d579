"""Build and load the retrieval artifact (``<root>/index/<version>/``).

Files: ``index.faiss`` (IVF-PQ), ``item_ids.npy``, ``item_vectors.npy`` (fused,
float16, for exact re-scoring, history queries and SimilarItems), ``user_ids.npy`` and
``user_vectors.npy`` (query per known user), ``popular_items.npy`` (item rows, most
popular first, for users with no history).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval_service.index import VectorIndex, build_index, choose_layout, recall_against_exact
from retrieval_service.vectors import fit_collaborative, fuse, user_queries
from shared.artifacts import Artifact, ArtifactError, ArtifactWriter, open_artifact
from shared.config import IndexBuildSettings
from shared.data import Dataset
from shared.embeddings import TextEmbedder
from shared.interactions import recency_weights
from shared.logs import event

log = logging.getLogger(__name__)

KIND = "vitrine.retrieval-index"
DEFAULT_NAME = "index"
RECALL_SAMPLE_QUERIES = 200
RECALL_AT = 100
RECALL_NPROBE = 32


def item_popularity(dataset: Dataset, cutoff: int, settings: IndexBuildSettings) -> npt.NDArray[np.float32]:
    """Time-decayed, intent-weighted interaction count per item as of ``cutoff``."""
    events = dataset.events.before(cutoff)
    weights = recency_weights(events.event_code, events.timestamp, cutoff, settings.history_half_life_days)
    return np.bincount(events.item_index, weights=weights, minlength=len(dataset.catalog)).astype(np.float32)


def build_index_artifact(
    dataset: Dataset,
    embedder: TextEmbedder,
    root: Path,
    settings: IndexBuildSettings,
    name: str = DEFAULT_NAME,
    cutoff: int | None = None,
) -> Artifact:
    """Embed, factorise, fuse and index; only events before ``cutoff`` are used."""
    started = time.perf_counter()
    cutoff = cutoff if cutoff is not None else int(dataset.events.timestamp.max()) + 1
    events = dataset.events.before(cutoff)
    catalog = dataset.catalog
    n_items, n_users = len(catalog), len(dataset.users)

    event(log, "embedding item texts", items=n_items, model=embedder.model_id)
    content = embedder.encode(catalog.embedding_texts(), show_progress=True)
    collaborative = fit_collaborative(events, n_users, n_items, settings)
    fused = fuse(content, collaborative.item_factors, settings)

    layout = choose_layout(n_items, fused.shape[1], settings)
    event(log, "training index", **layout.describe())
    index = build_index(fused, layout, settings.seed)
    stored_vectors = fused.astype(np.float16)
    queries = user_queries(events, stored_vectors.astype(np.float32), n_users, cutoff, settings)
    has_history = np.linalg.norm(queries, axis=1) > 0

    rng = np.random.default_rng(settings.seed)
    active = np.flatnonzero(has_history)
    sample = rng.choice(active, size=min(RECALL_SAMPLE_QUERIES, len(active)), replace=False) if len(active) else active
    recall = (
        recall_against_exact(VectorIndex(index, stored_vectors, RECALL_NPROBE), queries[sample], RECALL_AT)
        if len(sample)
        else float("nan")
    )
    popularity = item_popularity(dataset, cutoff, settings)
    popular_rows = np.argsort(-popularity, kind="stable").astype(np.int32)

    with ArtifactWriter(root, name) as writer:
        faiss.write_index(index, str(writer.path("index.faiss")))
        writer.save_array("item_ids.npy", catalog.item_ids)
        writer.save_array("item_vectors.npy", stored_vectors)
        writer.save_array("user_ids.npy", dataset.users.user_ids[has_history])
        writer.save_array("user_vectors.npy", queries[has_history].astype(np.float16))
        writer.save_array("popular_items.npy", popular_rows)
        params: dict[str, Any] = {
            "dataset": dataset.name,
            "cutoff": cutoff,
            "items": n_items,
            "users_with_history": int(has_history.sum()),
            "events_used": len(events),
            "embedding_model": embedder.model_id,
            "content_dim": int(content.shape[1]),
            "collaborative_dim": int(collaborative.item_factors.shape[1]),
            "layout": layout.describe(),
            "build": settings.model_dump(),
        }
        bytes_per_item = (
            index.sa_code_size() if layout.kind == "ivfpq" else 4 * layout.dimension
        ) + 2 * layout.dimension
        metrics: dict[str, Any] = {
            f"recall@{RECALL_AT}_vs_exact": round(recall, 4),
            "recall_nprobe": RECALL_NPROBE,
            "bytes_per_item_codes_and_vectors": bytes_per_item,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        artifact = writer.commit(KIND, params, metrics)
    event(log, "index artifact written", version=artifact.version, path=str(artifact.path), **metrics)
    return artifact


@dataclass(frozen=True)
class LoadedIndex:
    """Everything the retrieval service serves from one artifact version."""

    version: str
    index: VectorIndex
    item_ids: npt.NDArray[np.str_]
    item_row: dict[str, int]
    user_row: dict[str, int]
    user_vectors: npt.NDArray[np.float16]
    popular_rows: npt.NDArray[np.int32]
    content_dim: int
    collaborative_dim: int
    embedding_model: str
    build: IndexBuildSettings


def load_index_artifact(root: Path, nprobe: int, name: str = DEFAULT_NAME, version: str | None = None) -> LoadedIndex:
    artifact = open_artifact(root, name, KIND, version)
    params = artifact.params
    index = faiss.read_index(str(artifact.file("index.faiss")))
    item_ids = artifact.load_array("item_ids.npy")
    vectors = artifact.load_array("item_vectors.npy")
    user_ids = artifact.load_array("user_ids.npy")
    user_vectors = artifact.load_array("user_vectors.npy")
    if len(item_ids) != index.ntotal or len(user_ids) != len(user_vectors):
        raise ArtifactError(f"{artifact.path}: item/user tables do not match the index")
    loaded = LoadedIndex(
        version=artifact.version,
        index=VectorIndex(index, vectors, nprobe),
        item_ids=item_ids,
        item_row={item_id: row for row, item_id in enumerate(item_ids.tolist())},
        user_row={user_id: row for row, user_id in enumerate(user_ids.tolist())},
        user_vectors=user_vectors,
        popular_rows=artifact.load_array("popular_items.npy"),
        content_dim=int(params["content_dim"]),
        collaborative_dim=int(params["collaborative_dim"]),
        embedding_model=str(params["embedding_model"]),
        build=IndexBuildSettings.model_validate(params["build"]),
    )
    event(log, "index artifact loaded", version=artifact.version, items=len(item_ids), nprobe=nprobe)
    return loaded
