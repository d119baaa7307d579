"""Memory and latency of one index shard by size: the figures behind "shard or replicate?".

For each shard size, synthetic clustered item vectors of the serving dimension are
indexed with the build's own layout rule (:func:`choose_layout`) and written as a real
index artifact; then a fresh process loads it with the serving loader and measures its
resident memory and the latency of history queries through :class:`Retriever` (the
server's code path without gRPC) on one search thread, as the server runs them. Recall
against exact search is measured on the same queries. The text model (loaded once per
process when ``retrieval.text_queries`` is on) is not included. Run it with
``vitrine size-shards``.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval_service.artifact import IndexTables, load_index_artifact, write_index_artifact
from retrieval_service.index import build_index, choose_layout, recall_against_exact
from retrieval_service.retriever import Retriever
from retrieval_service.tuning import layout_spec
from retrieval_service.vectors import normalise_rows
from shared.artifacts import new_version
from shared.config import IndexBuildSettings

NAME = "sizing"
HISTORY_ITEMS = 10
WARM_UP_QUERIES = 20
RECALL_AT = 100


@dataclass(frozen=True)
class ShardFigures:
    items: int
    layout: str
    build_s: float
    files_mb: float
    rss_mb: float
    bytes_per_item: float
    search_p50_ms: float
    search_p95_ms: float
    search_p99_ms: float
    recall_at_100: float


def _synthetic_vectors(n: int, dimension: int, seed: int) -> npt.NDArray[np.float32]:
    """Unit vectors around one centre per ~200 items (categories), cosine ~0.7 to their centre."""
    rng = np.random.default_rng(seed)
    centres = normalise_rows(rng.standard_normal((max(16, n // 200), dimension)))
    noise = rng.standard_normal((n, dimension)).astype(np.float32) / np.sqrt(dimension)
    return normalise_rows(centres[rng.integers(0, len(centres), n)] + noise)


def _rss_bytes() -> int:
    # Linux: the second field of statm is the resident set in pages.
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()


def _measure_served(root: str, queries: int, candidates: int, nprobe: int, seed: int, out: Any) -> None:
    """In a fresh process: load as the server does, then time history queries."""
    faiss.omp_set_num_threads(1)
    before = _rss_bytes()
    loaded = load_index_artifact(Path(root), nprobe, NAME)
    retriever = Retriever(loaded, max_candidates=max(candidates, RECALL_AT), max_exclusions=0)
    resident = _rss_bytes() - before
    rng = np.random.default_rng(seed)
    item_ids = loaded.item_ids.tolist()
    histories = [
        [item_ids[row] for row in rng.integers(0, len(item_ids), HISTORY_ITEMS)]
        for _ in range(queries + WARM_UP_QUERIES)
    ]
    weights = rng.random((queries + WARM_UP_QUERIES, HISTORY_ITEMS)).tolist()
    timings = []
    for position, (history, weight) in enumerate(zip(histories, weights, strict=True)):
        started = time.perf_counter()
        retriever.by_history(history, weight, candidates, [])
        if position >= WARM_UP_QUERIES:
            timings.append((time.perf_counter() - started) * 1000.0)
    query_vectors = normalise_rows(
        np.vstack(
            [
                retriever.history_part(history, weight).vector
                for history, weight in zip(histories[WARM_UP_QUERIES:], weights[WARM_UP_QUERIES:], strict=True)
            ]
        )
    )
    recall = recall_against_exact(loaded.index, query_vectors, RECALL_AT)
    out.put(
        {
            "rss": resident,
            "p50": float(np.percentile(timings, 50)),
            "p95": float(np.percentile(timings, 95)),
            "p99": float(np.percentile(timings, 99)),
            "recall": recall,
        }
    )


def measure_shard(
    n_items: int, dimension: int, settings: IndexBuildSettings, queries: int, candidates: int, nprobe: int
) -> ShardFigures:
    vectors = _synthetic_vectors(n_items, dimension, settings.seed)
    layout = choose_layout(n_items, dimension, settings)
    # One build thread: on a busy machine OpenMP threads spinning against each other made
    # builds 2x slower, which says nothing about the index.
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    index = build_index(vectors, layout, settings.seed, opq_iterations=settings.opq_iterations)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="vitrine-sizing-") as root:
        tables = IndexTables(
            index=index,
            # Ids as long as the generator's ("SKU-000001"): the id table and map scale with them.
            item_ids=np.asarray([f"SKU-{row:06d}" for row in range(n_items)]),
            item_vectors=vectors.astype(np.float16),
            user_ids=np.zeros(0, dtype="<U8"),
            user_vectors=np.zeros((0, dimension), dtype=np.float16),
            popular_rows=np.arange(n_items, dtype=np.int32),
            popular_ranks=np.arange(n_items, dtype=np.int32),
        )
        params = {
            "content_dim": dimension - settings.als_factors,
            "collaborative_dim": settings.als_factors,
            "embedding_model": "synthetic",
            "build": settings.model_dump(),
            "shard": 0,
            "shard_count": 1,
        }
        artifact = write_index_artifact(Path(root), NAME, new_version(), tables, params, {})
        files = sum(entry["bytes"] for entry in artifact.manifest["files"].values())
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        child = context.Process(
            target=_measure_served, args=(root, queries, candidates, nprobe, settings.seed, results)
        )
        child.start()
        served = results.get(timeout=1800)
        child.join()
    return ShardFigures(
        items=n_items,
        layout=layout_spec(layout, refine="").label if layout.kind == "ivfpq" else "flat",
        build_s=round(build_s, 1),
        files_mb=round(files / 2**20, 1),
        rss_mb=round(served["rss"] / 2**20, 1),
        bytes_per_item=round(served["rss"] / n_items),
        search_p50_ms=round(served["p50"], 2),
        search_p95_ms=round(served["p95"], 2),
        search_p99_ms=round(served["p99"], 2),
        recall_at_100=round(served["recall"], 4),
    )


def table(figures: list[ShardFigures]) -> str:
    """A markdown table of the measurements."""
    header = (
        "| items per shard | layout | build s | files MiB | resident MiB | bytes/item "
        "| search p50 ms | p95 ms | p99 ms | recall@100 |"
    )
    rows = [header, "|" + "---|" * 10]
    for figure in figures:
        values: dict[str, Any] = asdict(figure)
        rows.append(
            "| "
            + " | ".join(f"{value:,}" if isinstance(value, int) else str(value) for value in values.values())
            + " |"
        )
    return "\n".join(rows)
