"""Index benchmark: a grid of layouts × nprobe against exact search on one catalogue.

The IVF coarse quantiser is trained once per vector space and the 1M assignments are
computed once (OPQ is a rotation, so its centroids are the rotated ones and the
assignments do not change); each layout then trains only its PQ on a sample and adds
the pre-assigned vectors. Refine stores (SQ8, float16) are built once and shared by every
layout that re-scores with them. Builds use every core; every latency is one query at a
time on ONE FAISS thread (``faiss.omp_set_num_threads(1)``), as the server searches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.ivf_tools import add_preassigned

from retrieval_service.index import training_sample
from retrieval_service.tuning import Choice, LayoutSpec, Measurement, choose, latency_percentiles, parse_layout
from shared.config import BenchSettings, IndexTuningSettings
from shared.logs import event

log = logging.getLogger(__name__)

CHUNK = 100_000
OPQ_ITERATIONS = 10
OPQ_SAMPLE = 32_768
FLAT_LATENCY_QUERIES = 10
BUILD_THREADS = 2


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    build_s: float  # this layout's own training and adding (the shared coarse step is separate)
    bytes_per_item: float
    points: list[Measurement]


@dataclass
class IndexBenchResult:
    items: int
    dimension: int
    queries: int
    recall_at: int
    train_sample: int
    exact_batch_s: float
    exact_p50_ms: float
    coarse_s: dict[str, float] = field(default_factory=dict)
    layouts: list[LayoutResult] = field(default_factory=list)
    choice: dict[str, Any] = field(default_factory=dict)
    served_choice: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def measurements(self) -> list[Measurement]:
        return [point for layout in self.layouts for point in layout.points]


@dataclass
class _Space:
    """A vector space the IVF lives in: the raw vectors or a PCA projection."""

    vectors: npt.NDArray[np.float32]
    sample: npt.NDArray[np.float32]
    centroids: npt.NDArray[np.float32]
    assignment: npt.NDArray[np.int64]
    transform: faiss.VectorTransform | None = None


def _apply(transform: faiss.VectorTransform, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out = np.empty((len(vectors), transform.d_out), dtype=np.float32)
    for start in range(0, len(vectors), CHUNK):
        out[start : start + CHUNK] = transform.apply(np.ascontiguousarray(vectors[start : start + CHUNK]))
    return out


def _assign(centroids: npt.NDArray[np.float32], vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    out = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), CHUNK):
        _, found = quantizer.search(np.ascontiguousarray(vectors[start : start + CHUNK]), 1)
        out[start : start + CHUNK] = found[:, 0]
    return out


def _coarse(
    vectors: npt.NDArray[np.float32], sample: npt.NDArray[np.float32], nlist: int, iterations: int, seed: int
) -> _Space:
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.cp.niter = iterations
    ivf.train(sample)
    centroids = quantizer.reconstruct_n(0, nlist)
    return _Space(vectors, sample, centroids, _assign(centroids, vectors))


class GridBuilder:
    """Builds layouts over one catalogue, sharing coarse quantisers and refine stores."""

    def __init__(self, vectors: npt.NDArray[np.float32], train_sample: int, iterations: int, seed: int) -> None:
        self.vectors = vectors
        self.seed = seed
        self.iterations = iterations
        self.sample = training_sample(vectors, train_sample, seed)
        self.coarse_s: dict[str, float] = {}
        self._spaces: dict[str, _Space] = {}
        self._refines: dict[str, faiss.Index] = {}
        self._bases: dict[str, faiss.Index] = {}
        self._keep: list[Any] = []  # SWIG objects referenced by built indexes

    def _space(self, spec: LayoutSpec) -> _Space:
        key = f"PCA{spec.transform_dim},IVF{spec.nlist}" if spec.transform == "PCA" else f"IVF{spec.nlist}"
        if key not in self._spaces:
            started = time.perf_counter()
            if spec.transform == "PCA":
                pca = faiss.PCAMatrix(self.vectors.shape[1], spec.transform_dim)
                pca.train(self.sample)
                projected = _apply(pca, self.vectors)
                space = _coarse(projected, _apply(pca, self.sample), spec.nlist, self.iterations, self.seed)
                space.transform = pca
            else:
                space = _coarse(self.vectors, self.sample, spec.nlist, self.iterations, self.seed)
            self._spaces[key] = space
            self.coarse_s[key] = round(time.perf_counter() - started, 2)
            event(log, "coarse quantiser trained and assigned", space=key, seconds=self.coarse_s[key])
        return self._spaces[key]

    def _refine_store(self, kind: str) -> faiss.Index:
        if kind not in self._refines:
            qtype = {"SQ8": faiss.ScalarQuantizer.QT_8bit, "FP16": faiss.ScalarQuantizer.QT_fp16}[kind]
            store = faiss.IndexScalarQuantizer(self.vectors.shape[1], qtype, faiss.METRIC_INNER_PRODUCT)
            store.train(self.sample)
            for start in range(0, len(self.vectors), CHUNK):
                store.add(np.ascontiguousarray(self.vectors[start : start + CHUNK]))
            self._refines[kind] = store
        return self._refines[kind]

    def base(self, spec: LayoutSpec) -> faiss.Index:
        """A built layout without its refine stage (KeyError when it was not built)."""
        return self._bases[replace(spec, refine="").label]

    def build(self, spec: LayoutSpec, refine_factor: int) -> faiss.Index:
        """The layout; its base (everything but the refine) is built once and shared."""
        base_spec = replace(spec, refine="")
        if base_spec.label not in self._bases:
            self._bases[base_spec.label] = self._build_base(base_spec)
        index = self._bases[base_spec.label]
        if not spec.refine:
            return index
        refined = faiss.IndexRefine(index, self._refine_store(spec.refine))
        refined.k_factor = spec.refine_factor or refine_factor
        return refined

    def _build_base(self, spec: LayoutSpec) -> faiss.Index:
        space = self._space(spec)
        vectors, sample, centroids = space.vectors, space.sample, space.centroids
        transform: faiss.VectorTransform | None = space.transform
        if spec.transform == "OPQ":
            opq = faiss.OPQMatrix(vectors.shape[1], spec.pq_m)
            opq.niter = OPQ_ITERATIONS
            opq.train(np.ascontiguousarray(sample[:OPQ_SAMPLE]))
            vectors, sample, centroids = _apply(opq, vectors), _apply(opq, sample), _apply(opq, centroids)
            transform = opq
        dimension = vectors.shape[1]
        quantizer = faiss.IndexFlatIP(dimension)
        quantizer.add(centroids)
        ivf = faiss.IndexIVFPQ(quantizer, dimension, spec.nlist, spec.pq_m, spec.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.pq.cp.seed = self.seed
        ivf.pq.cp.niter = self.iterations
        ivf.train(sample)  # the quantiser is complete, so only the PQ is trained
        add_preassigned(ivf, vectors, space.assignment)  # type: ignore[no-untyped-call]
        self._keep.append(quantizer)
        index: faiss.Index = ivf
        if spec.fast_scan:
            index = faiss.IndexIVFPQFastScan(ivf)
            self._keep.append(ivf)
        if transform is not None:
            self._keep.extend([transform, index])
            index = faiss.IndexPreTransform(transform, index)
        return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    faiss.extract_index_ivf(index).nprobe = nprobe


def measure(
    index: faiss.Index,
    queries: npt.NDArray[np.float32],
    exact: npt.NDArray[np.int64],
    nprobe: int,
    label: str,
    size: float,
    refine_factor: int = 0,
) -> Measurement:
    """Single-query search of every query on the calling thread: recall@k and latency."""
    set_nprobe(index, nprobe)
    k = exact.shape[1]
    timings, hits = [], 0
    for row in range(len(queries)):
        query = queries[row : row + 1]
        started = time.perf_counter()
        _, found = index.search(query, k)
        timings.append(time.perf_counter() - started)
        hits += len(np.intersect1d(found[0], exact[row]))
    p50, p99 = latency_percentiles(timings)
    recall = round(hits / float(exact.size), 4)
    return Measurement(label, nprobe, recall, round(p50, 4), round(p99, 4), size, refine_factor)


def exact_reference(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.int64], float, float]:
    """Exact top k by brute force (all threads), its batch time and the one-thread single-query p50."""
    started = time.perf_counter()
    _, exact = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    batch_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    timings = []
    for row in range(min(FLAT_LATENCY_QUERIES, len(queries))):
        started = time.perf_counter()
        faiss.knn(queries[row : row + 1], vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        timings.append(time.perf_counter() - started)
    faiss.omp_set_num_threads(BUILD_THREADS)
    return np.asarray(exact, dtype=np.int64), batch_s, latency_percentiles(timings)[0]


def servable(spec: LayoutSpec) -> bool:
    """What the retrieval service can serve today: IVF-PQ (8-bit or fast-scan codes, maybe
    OPQ-rotated) re-scored from float16."""
    return spec.transform in ("", "OPQ") and spec.refine == "FP16"


def run_index_bench(
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    bench: BenchSettings,
    tuning: IndexTuningSettings,
    train_sample: int,
    iterations: int,
    seed: int,
) -> tuple[IndexBenchResult, GridBuilder]:
    """The measurements, and the builder holding every base index it built."""
    faiss.omp_set_num_threads(BUILD_THREADS)
    k = tuning.recall_at
    exact, exact_batch_s, exact_p50 = exact_reference(vectors, queries, k)
    result = IndexBenchResult(
        items=len(vectors),
        dimension=int(vectors.shape[1]),
        queries=len(queries),
        recall_at=k,
        train_sample=min(train_sample, len(vectors)),
        exact_batch_s=round(exact_batch_s, 2),
        exact_p50_ms=round(exact_p50, 2),
    )
    event(log, "exact reference", items=len(vectors), batch_s=result.exact_batch_s, single_query_p50_ms=exact_p50)
    builder = GridBuilder(vectors, train_sample, iterations, seed)
    specs = [parse_layout(text.replace("{nlist}", str(bench.nlist))) for text in bench.layouts]
    refines: list[faiss.Index] = []
    for spec in specs:
        started = time.perf_counter()
        coarse_before = sum(builder.coarse_s.values())
        index = builder.build(spec, bench.refine_factor)
        build_s = time.perf_counter() - started - (sum(builder.coarse_s.values()) - coarse_before)
        size = spec.bytes_per_item(result.dimension)
        faiss.omp_set_num_threads(1)
        factor = (spec.refine_factor or bench.refine_factor) if spec.refine else 0
        points = [measure(index, queries, exact, nprobe, spec.label, size, factor) for nprobe in bench.nprobes]
        faiss.omp_set_num_threads(BUILD_THREADS)
        result.layouts.append(LayoutResult(spec.label, round(build_s, 2), size, points))
        refines.append(index)  # an IndexRefine must outlive nothing it points to: keep it until the end
        event(
            log,
            "layout measured",
            layout=spec.label,
            build_s=round(build_s, 1),
            bytes_per_item=size,
            recall=[p.recall for p in points],
            p50_ms=[round(p.p50_ms, 3) for p in points],
        )
    del refines
    result.coarse_s = dict(builder.coarse_s)
    choice: Choice = choose(result.measurements(), tuning)
    result.choice = choice.describe()
    served = [p for p in result.measurements() if servable(parse_layout(p.layout))]
    if served:
        result.served_choice = choose(served, tuning).describe()
    return result, builder


def plot(result: IndexBenchResult, tuning: IndexTuningSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for layout in result.layouts:
        recalls = [p.recall for p in layout.points]
        latencies = [p.p50_ms for p in layout.points]
        axes.plot(recalls, latencies, marker="o", label=f"{layout.layout} ({layout.bytes_per_item:g} B/item)")
        for point in layout.points:
            axes.annotate(str(point.nprobe), (point.recall, point.p50_ms), fontsize=6, alpha=0.7)
    axes.axvline(tuning.target_recall, color="grey", linestyle="--", linewidth=0.8)
    axes.axhline(tuning.max_latency_ms, color="grey", linestyle=":", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xlabel(f"recall@{result.recall_at} vs exact search")
    axes.set_ylabel("single-query p50 latency, ms (1 thread)")
    axes.set_title(
        f"{result.items:,} items, d={result.dimension}: recall/latency by layout (labels: nprobe)", fontsize=10
    )
    axes.legend(fontsize=7, loc="upper left")
    axes.grid(alpha=0.3, which="both")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
