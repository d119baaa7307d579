"""End-to-end benchmark: 1M-item artifacts, both services as processes, and the floor.

* :func:`build_artifacts` writes a real index artifact (the served layout, trained on a
  sample, nprobe tuned and recorded in the manifest) and a real ranker artifact (LightGBM
  LambdaMART trained on synthetic requests whose candidates and features come through the
  serving code: :class:`Retriever` and :class:`FeatureBuilder`).
* :func:`start_service` runs ``python -m shared.cli serve ...`` and waits for its port
  file (written once SERVING), which times start-up; :func:`rss_mb` reads its memory.
* :func:`floor` runs the same stages in this process without gRPC: retrieval through
  :class:`Retriever`, then :meth:`RankingPipeline.recommend`, one request at a time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import faiss
import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from benchmarks.synthetic import SyntheticCatalogue
from ranking_service.artifact import load_ranker_artifact, write_ranker_artifact
from ranking_service.candidates import CandidateStage
from ranking_service.features import CATEGORICAL_FEATURES, FEATURE_NAMES, FeatureBuilder, RequestContext
from ranking_service.pipeline import RankingPipeline, RecommendQuery
from ranking_service.ragged import Ragged
from ranking_service.retrieval_client import NO_OPTIONS, RetrievalOptions, RetrievedCandidates
from ranking_service.scoring import score_prior
from ranking_service.store import UserHistoryStore, item_stats, item_table
from retrieval_service.artifact import IndexTables, describe_layout, load_index_artifact, write_index_artifact
from retrieval_service.index import IndexLayout, VectorIndex, build_index
from retrieval_service.retriever import Candidates, QueryOptions, Retriever
from retrieval_service.server import preferences as declared_preferences
from retrieval_service.tuning import latency_percentiles, recall_of, tune_search
from retrieval_service.vectors import user_queries
from shared.artifacts import new_version
from shared.commands import start_server_process, vitrine_command
from shared.config import (
    ALL_TIME_POPULARITY,
    BenchSettings,
    IndexBuildSettings,
    RankerBuildSettings,
    RankingSettings,
    load_settings,
)
from shared.data import Dataset
from shared.logs import event
from shared.proto.vitrine.v1 import catalog_pb2

log = logging.getLogger(__name__)

WARM_UP_SEARCHES = 20

START_TIMEOUT_S = 600.0
TRAIN_CANDIDATES = 200


@dataclass(frozen=True)
class BuiltArtifacts:
    root: Path
    index_build_s: float
    index_nprobe: int
    index_refine_factor: int
    index_recall: float
    index_layout: str
    ranker_train_s: float
    ranker_trees: int
    snapshot_at: int


class InProcessRetrieval:
    """A :class:`CandidateSource` that calls :class:`Retriever` directly (the floor: no gRPC)."""

    target = "in-process"

    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    def _answer(self, found: Candidates) -> RetrievedCandidates:
        """What the served client reads from a columnar answer: the same fields (sources,
        source scores, anchors, stock), so the floor computes the same features."""
        counts = [len(tags) for tags in found.sources]
        return RetrievedCandidates(
            item_ids=found.item_ids,
            scores=np.asarray(found.scores, dtype=np.float32),
            content_scores=np.asarray(found.content_scores, dtype=np.float32),
            collaborative_scores=np.asarray(found.collaborative_scores, dtype=np.float32),
            from_popular=found.source == "popular",
            index_version=found.index_version,
            sources=Ragged.from_counts(list(chain.from_iterable(found.sources)), counts),
            # float32, as the answer carries them.
            source_scores=Ragged.from_counts(
                np.asarray(list(chain.from_iterable(found.source_scores)), dtype=np.float32).tolist(), counts
            ),
            anchor_ids=Ragged.from_counts(
                list(chain.from_iterable(found.anchors)), [len(anchors) for anchors in found.anchors]
            ),
            stock=np.asarray(found.stock, dtype=np.int64),
        )

    def by_history(
        self,
        item_ids: Sequence[str],
        weights: Sequence[float],
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        return self._answer(self._retriever.by_history(item_ids, weights, n, exclude, _query_options(options)))

    def by_user(
        self, user_id: str, n: int, exclude: Sequence[str], timeout_s: float, options: RetrievalOptions = NO_OPTIONS
    ) -> RetrievedCandidates:
        return self._answer(self._retriever.by_user(user_id, n, exclude, _query_options(options)))

    def by_preferences(
        self,
        preferences: catalog_pb2.DeclaredPreferences,
        n: int,
        exclude: Sequence[str],
        timeout_s: float,
        options: RetrievalOptions = NO_OPTIONS,
    ) -> RetrievedCandidates:
        return self._answer(
            self._retriever.by_preferences(declared_preferences(preferences), n, exclude, _query_options(options))
        )

    def wait_ready(self, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        return None


def _query_options(options: RetrievalOptions) -> QueryOptions:
    """The served request's options as the retriever takes them (the bench sends no filter)."""
    return QueryOptions(
        mix=list(options.mix), session_item_ids=list(options.session_item_ids), with_anchors=options.anchors
    )


def _synthetic_labels(
    rows: npt.NDArray[np.int32], history_rows: npt.NDArray[np.int32], cluster: npt.NDArray[np.int32], seed: int
) -> npt.NDArray[np.int32]:
    """Relevance the ranker can learn: same cluster as the history's most common one, plus noise."""
    rng = np.random.default_rng(seed)
    home = int(np.bincount(cluster[history_rows]).argmax()) if len(history_rows) else -1
    score = (cluster[rows] == home).astype(np.float64) * 0.3 + rng.random(len(rows)) * 0.75
    labels: npt.NDArray[np.int32] = np.digitize(score, [0.8, 0.95, 1.0]).astype(np.int32)
    return labels


def build_artifacts(
    root: Path,
    catalogue: SyntheticCatalogue,
    fused: npt.NDArray[np.float32],
    dataset: Dataset,
    queries: npt.NDArray[np.float32],
    layout: IndexLayout,
    index_settings: IndexBuildSettings,
    ranker_settings: RankerBuildSettings,
    bench: BenchSettings,
    index: faiss.Index | None = None,
    index_build_s: float | None = None,
) -> BuiltArtifacts:
    """``index``: an already built IVF-PQ of ``layout`` over ``fused`` (else built here)."""
    faiss.omp_set_num_threads(2)
    snapshot_at = int(dataset.events.timestamp.max()) + 1
    if index is None or index_build_s is None:
        started = time.perf_counter()
        index = build_index(
            fused,
            layout,
            index_settings.seed,
            index_settings.train_sample,
            index_settings.train_iterations,
            opq_iterations=index_settings.opq_iterations,
        )
        index_build_s = time.perf_counter() - started
    stored = fused.astype(np.float16)
    code_bytes = index.sa_code_size()
    faiss.omp_set_num_threads(1)
    tuned = tune_search(
        VectorIndex(index, stored, 1),
        queries,
        index_settings.tuning,
        describe_layout(layout),
        code_bytes + 2 * fused.shape[1],
    )
    faiss.omp_set_num_threads(2)
    users = user_queries(dataset.events, fused, catalogue.content_dim, len(dataset.users), snapshot_at, index_settings)
    has_history = np.linalg.norm(users, axis=1) > 0
    popularity = np.bincount(dataset.events.item_index, minlength=len(fused)).astype(np.float64)
    popular_rows = np.argsort(-popularity, kind="stable").astype(np.int32)
    tables = IndexTables(
        index=index,
        item_ids=dataset.catalog.item_ids,
        item_vectors=stored,
        user_ids=dataset.users.user_ids[has_history],
        user_vectors=users[has_history].astype(np.float16),
        popular_rows=popular_rows,
        popular_ranks=np.arange(len(popular_rows), dtype=np.int32),
    )
    chosen = tuned.choice.measurement
    params: dict[str, Any] = {
        "dataset": dataset.name,
        "catalogue_items": len(fused),
        "content_dim": catalogue.content_dim,
        "collaborative_dim": int(fused.shape[1] - catalogue.content_dim),
        "embedding_model": "synthetic",
        "build": index_settings.model_dump(),
        "shard": 0,
        "shard_count": 1,
        "items": len(fused),
        "layout": layout.describe(),
        "search": {"nprobe": chosen.nprobe, "refine_factor": chosen.refine_factor},
    }
    metrics = {
        f"recall@{index_settings.tuning.recall_at}_vs_exact": chosen.recall,
        "recall_nprobe": chosen.nprobe,
        "recall_refine_factor": chosen.refine_factor,
        "bytes_per_item_codes_and_vectors": code_bytes + 2 * fused.shape[1],
        "build_seconds": round(index_build_s, 2),
        "tuning": tuned.describe(),
    }
    write_index_artifact(root, "index", new_version(), tables, params, metrics)
    event(log, "bench index artifact written", build_s=round(index_build_s, 1), nprobe=chosen.nprobe)

    started = time.perf_counter()
    items = item_table(dataset, catalogue.content)
    stats = item_stats(dataset.events, len(items), snapshot_at, ranker_settings)
    histories = UserHistoryStore(dataset.events, dataset.users.user_ids)
    loaded = load_index_artifact(root)
    retrieval = InProcessRetrieval(Retriever(loaded, max_candidates=1000, max_exclusions=10_000))
    serving = RankingSettings(candidates=TRAIN_CANDIDATES, fallback_to_popular=False)
    # As the ranker artifact records (ranker_build) and the service will serve it.
    stage = CandidateStage(
        items,
        items.row_of(),
        stats.popular_rows,
        retrieval,
        serving,
        popular_candidates=ranker_settings.popular_candidates,
    )
    builder = FeatureBuilder(items, stats)
    rng = np.random.default_rng(ranker_settings.seed)
    features, labels, groups = [], [], []
    for request in range(bench.ranker_requests):
        user_id = str(dataset.users.user_ids[int(rng.integers(0, len(dataset.users)))])
        history = histories.history(user_id, before=snapshot_at)
        context = RequestContext(timestamp=snapshot_at, device="web", session_rows=np.zeros(0, np.int32))
        retrieved = stage.retrieve(user_id, history, context, np.zeros(0, np.int32), 10.0)
        rows = retrieved.candidates.rows
        features.append(builder.build(history, context, retrieved.candidates).values)
        labels.append(_synthetic_labels(rows, history.item_rows, catalogue.cluster, request))
        groups.append(len(rows))
    lgb_params: dict[str, Any] = {
        "objective": "lambdarank",
        "num_leaves": ranker_settings.num_leaves,
        "learning_rate": ranker_settings.learning_rate,
        "min_data_in_leaf": ranker_settings.min_data_in_leaf,
        "seed": ranker_settings.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbose": -1,
    }
    # No early stopping: the model keeps the configured size (num_trees x num_leaves), the
    # capacity a production ranker may reach. It starts from the configured prior, as served.
    values = np.vstack(features)
    prior = score_prior(ranker_settings)
    booster = lgb.train(
        lgb_params,
        lgb.Dataset(
            values,
            init_score=prior.of(values) if prior is not None else None,
            label=np.concatenate(labels),
            group=groups,
            feature_name=list(FEATURE_NAMES),
            categorical_feature=list(CATEGORICAL_FEATURES),
        ),
        num_boost_round=ranker_settings.num_trees,
    )
    ranker_train_s = time.perf_counter() - started
    write_ranker_artifact(
        root,
        booster,
        items,
        dataset,
        snapshot_at,
        {
            "dataset": dataset.name,
            "lightgbm": lgb_params,
            "synthetic_labels": True,
            "ranker_build": ranker_settings.model_dump(),
        },
        {"train_requests": bench.ranker_requests, "train_seconds": round(ranker_train_s, 2)},
        ranker_settings.item_model,
        ALL_TIME_POPULARITY,  # the bench index's popular items are all-time counts
    )
    event(log, "bench ranker artifact written", trees=booster.num_trees(), train_s=round(ranker_train_s, 1))
    return BuiltArtifacts(
        root=root,
        index_build_s=round(index_build_s, 2),
        index_nprobe=chosen.nprobe,
        index_refine_factor=chosen.refine_factor,
        index_recall=chosen.recall,
        index_layout=describe_layout(layout),
        ranker_train_s=round(ranker_train_s, 2),
        ranker_trees=booster.num_trees(),
        snapshot_at=snapshot_at,
    )


# -- services as processes ---------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    start_s: float
    log_path: Path
    started_at: float = 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def service_environment(extra: dict[str, str]) -> dict[str, str]:
    """This checkout first on the path (the venv's editable install may point elsewhere)."""
    root = str(Path(__file__).resolve().parent.parent)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    environment.update(extra)
    return environment


def start_service(kind: str, args: list[str], env: dict[str, str], workdir: Path) -> Service:
    """``python -m shared.cli serve KIND ...``; returns once it serves, with its start-up time."""
    log_path = workdir / f"{kind}.log"
    started = time.perf_counter()
    process, port = start_server_process(
        vitrine_command("serve", kind, *args),
        workdir / f"{kind}.port",
        log_path,
        service_environment(env),
        timeout_s=START_TIMEOUT_S,
        append_log=False,
    )
    start_s = time.perf_counter() - started
    event(log, "service serving", service=kind, port=port, start_s=round(start_s, 2), pid=process.pid)
    return Service(kind, process, port, round(start_s, 2), log_path, started)


def wait_for_log(service: Service, markers: tuple[str, ...], timeout_s: float) -> tuple[str, float]:
    """Wait until the service's log holds one of ``markers``: (the marker, seconds since start)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        text = service.log_path.read_text(errors="replace")
        for marker in markers:
            if marker in text:
                return marker, round(time.perf_counter() - service.started_at, 2)
        time.sleep(0.2)
    return "", round(time.perf_counter() - service.started_at, 2)


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024.0, 1)
    return {"rss_mb": fields.get("VmRSS", 0.0), "peak_rss_mb": fields.get("VmHWM", 0.0)}


# -- the floor -----------------------------------------------------------------------------


@dataclass
class FloorResult:
    backend: str
    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float
    stage_mean_ms: dict[str, float] = field(default_factory=dict)
    load_s: float = 0.0


def recommend_queries(dataset: Dataset, count: int, k: int, snapshot_at: int, seed: int) -> list[RecommendQuery]:
    """The request mix of both the load generator and the floor: known users, no session."""
    rng = np.random.default_rng(seed)
    users = dataset.users.user_ids[rng.integers(0, len(dataset.users), count)].tolist()
    return [RecommendQuery(str(user), k, snapshot_at, "web", [], []) for user in users]


def load_floor(root: Path, settings: RankingSettings) -> tuple[RankingPipeline, float]:
    """Both artifacts loaded in this process; waits for the compiled trees when they are on."""
    started = time.perf_counter()
    faiss.omp_set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")  # as both servers run
    served = load_settings().retrieval  # the retrieval server's settings: same search, same work
    retriever = Retriever(
        load_index_artifact(root, max_rescored_rows=served.max_rescored_rows),
        max_candidates=served.max_candidates,
        max_exclusions=served.max_exclusions,
    )
    pipeline = RankingPipeline(load_ranker_artifact(root), InProcessRetrieval(retriever), settings)
    pipeline.scorer.start_compiling()
    pipeline.scorer.ready.wait(START_TIMEOUT_S)
    return pipeline, time.perf_counter() - started


def floor(
    pipeline: RankingPipeline, queries: list[RecommendQuery], warm_up: int, pace_rps: float | None = None
) -> tuple[FloorResult, list[tuple[str, ...]]]:
    """The same stages in this process, sequentially, one thread for search and predict.

    ``pace_rps``: start request i at ``t0 + i / pace_rps`` (idle in between, as the served
    open loop is at that rate) instead of back to back; a CPU left idle between requests on
    a shared machine comes back with cold caches, which back-to-back requests never see.
    Also returns the recommended item ids per timed query (to compare two configurations).
    """
    for query in queries[:warm_up]:
        pipeline.recommend(query, 1.0)
    answers: list[tuple[str, ...]] = []
    timings: list[float] = []
    stages: dict[str, list[float]] = {}
    started_all = time.perf_counter()
    for position, query in enumerate(queries[warm_up:]):
        if pace_rps:
            delay = started_all + position / pace_rps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        started = time.perf_counter()
        result = pipeline.recommend(query, 1.0)
        timings.append(time.perf_counter() - started)
        answers.append(tuple(item.item_id for item in result.items))
        for stage, millis in result.stage_ms.items():
            stages.setdefault(stage, []).append(millis)
    elapsed = time.perf_counter() - started_all
    p50, p99 = latency_percentiles(timings)
    return FloorResult(
        backend=pipeline.scorer.backend,
        requests=len(timings),
        p50_ms=round(p50, 3),
        p95_ms=round(float(np.percentile(np.asarray(timings) * 1000.0, 95)), 3),
        p99_ms=round(p99, 3),
        throughput_rps=round(len(timings) / elapsed, 1),
        stage_mean_ms={stage: round(float(np.mean(values)), 3) for stage, values in stages.items()},
    ), answers


def rescore_cap_lever(
    root: Path, queries: npt.NDArray[np.float32], n: int, max_rescored_rows: int
) -> dict[str, dict[str, float]]:
    """The served search for ``n`` candidates (one FAISS thread) with the re-score capped at
    ``max_rescored_rows`` rows (``retrieval.max_rescored_rows``, as served) and uncapped
    (factor x n rows): rows re-scored, recall@n against exact search, p50 and p99 ms."""
    faiss.omp_set_num_threads(1)
    exact: npt.NDArray[np.int64] | None = None
    variants: dict[str, dict[str, float]] = {}
    for label, cap in (("capped", max_rescored_rows), ("uncapped", None)):
        index = load_index_artifact(root, max_rescored_rows=cap).index
        if exact is None:
            exact = index.exact_search(queries, n)
        for query in queries[:WARM_UP_SEARCHES]:  # a freshly loaded index answers its first searches cold
            index.search(query[None, :], n)
        found, timings = [], []
        for query in queries:
            started = time.perf_counter()
            rows, _ = index.search(query[None, :], n)
            timings.append(time.perf_counter() - started)
            found.append(rows)
        p50, p99 = latency_percentiles(timings)
        variants[label] = {
            "rescored_rows": index.shortlist_size(n),
            f"recall@{n}": round(recall_of(found, exact), 4),
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
        }
    return variants
