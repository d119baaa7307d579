"""The FAISS IVF-PQ index and its exact re-scoring.

IVF-PQ finds a shortlist fast from compact codes; the shortlist is then re-scored with
the stored (float16) fused vectors, so the scores handed to the ranker are exact inner
products and the order within the shortlist is exact too. Both steps run inside FAISS (an
``IndexRefine`` whose re-scoring index reads the float16 store in place).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from shared.config import IndexBuildSettings
from shared.logs import event

log = logging.getLogger(__name__)

# Below this many items an IVF-PQ cannot be trained sensibly: exact search is used.
MIN_ITEMS_FOR_IVFPQ = 1000
# FAISS wants ~39 training points per centroid.
POINTS_PER_CENTROID = 39
# Shortlist = refine_factor x n from IVF-PQ, then exact re-scoring (the default; the build's
# autotuner may choose another and record it in the manifest).
REFINE_FACTOR = 3
# Rows added after the build (upserted items) are scored exactly in every search while there
# are at most this many: they sit in IVF lists trained without them (often a few lists far
# from the catalogue's), where a small nprobe misses them. Beyond it, the IVF lists alone.
EXACT_FRESH_ROWS = 10_000


@dataclass(frozen=True)
class IndexLayout:
    kind: str  # "ivfpq" or "flat"
    dimension: int
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    # A learned rotation (OPQ) before IVF-PQ: it balances the variance across PQ
    # sub-spaces at no cost in code bytes (make bench, 1M items, nprobe 32: recall@100 of
    # the bare codes 0.45 -> 0.72, with a 10x re-scored shortlist 0.89 -> 0.95).
    opq: bool = False
    # 4-bit PQ codes in FAISS's SIMD fast-scan layout (IndexIVFPQFastScan), twice as many
    # sub-quantisers for the same bytes: at 1M items the code scan is ~5x faster (nprobe 64:
    # 2.2 -> 0.5 ms), which pays for a 20x re-scored shortlist within 2 ms (docs/benchmarks.md).
    fast_scan: bool = False

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def choose_layout(n_items: int, dimension: int, settings: IndexBuildSettings) -> IndexLayout:
    """nlist ~ 4 sqrt(n) (capped by training points), PQ codes of ~1 byte per 8 dimensions:
    8-bit codes with d/8 sub-quantisers, or in large catalogues 4-bit fast-scan codes with d/4."""
    if n_items < MIN_ITEMS_FOR_IVFPQ:
        return IndexLayout(kind="flat", dimension=dimension)
    nlist = settings.nlist or max(1, min(int(4 * math.sqrt(n_items)), n_items // POINTS_PER_CENTROID))
    fast_scan = n_items >= settings.fast_scan_min_items
    dimensions_per_code = 4 if fast_scan else 8
    pq_m = settings.pq_m or next(
        m for m in range(max(1, dimension // dimensions_per_code), 0, -1) if dimension % m == 0
    )
    if dimension % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the vector dimension {dimension}")
    # Fewer code bits for small catalogues: each of the 2^nbits PQ centroids needs training points.
    pq_nbits = 4 if fast_scan else max(4, min(settings.pq_nbits, int(math.log2(n_items / POINTS_PER_CENTROID))))
    opq = n_items >= settings.opq_min_items
    return IndexLayout(
        kind="ivfpq",
        dimension=dimension,
        nlist=nlist,
        pq_m=pq_m,
        pq_nbits=pq_nbits,
        opq=opq,
        fast_scan=fast_scan,
    )


def training_sample(vectors: npt.NDArray[np.float32], size: int, seed: int) -> npt.NDArray[np.float32]:
    """At most ``size`` rows, a seeded sample (sorted rows, so the copy reads memory in order)."""
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])


def build_index(
    vectors: npt.NDArray[np.float32],
    layout: IndexLayout,
    seed: int,
    train_sample: int | None = None,
    train_iterations: int | None = None,
    *,
    opq_iterations: int,
) -> faiss.Index:
    """Train on ``train_sample`` rows at most (all when None), then add every vector.

    An OPQ layout is an ``IndexPreTransform`` (rotation, then IVF-PQ): searches, adds and
    removals go through the rotation, and :func:`faiss.extract_index_ivf` still reaches
    the IVF for nprobe. A fast-scan layout is an ``IndexIVFPQFastScan``: the same search
    parameters and ID selectors (FAISS >= 1.8), its own code packing."""
    if vectors.shape[1] != layout.dimension:
        raise ValueError(f"vectors have dimension {vectors.shape[1]}, layout says {layout.dimension}")
    if layout.kind == "flat":
        flat = faiss.IndexFlatIP(layout.dimension)
        flat.add(vectors)
        return flat
    quantizer = faiss.IndexFlatIP(layout.dimension)
    ivfpq = faiss.IndexIVFPQFastScan if layout.fast_scan else faiss.IndexIVFPQ
    index = ivfpq(quantizer, layout.dimension, layout.nlist, layout.pq_m, layout.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    if train_iterations is not None:
        index.cp.niter = train_iterations
        index.pq.cp.niter = train_iterations
    served: faiss.Index = index
    if layout.opq:
        rotation = faiss.OPQMatrix(layout.dimension, layout.pq_m)
        rotation.niter = opq_iterations
        # Train the rotation with the index's own PQ (its bits), not OPQ's default 8-bit one.
        rotation.pq = index.pq
        served = faiss.IndexPreTransform(rotation, index)  # FAISS's wrapper keeps both referenced
    served.train(training_sample(vectors, train_sample or len(vectors), seed))
    served.add(vectors)
    return served


class ReadWriteLock:
    """Many readers or one writer; a waiting writer stops new readers (it cannot starve).

    Searches read the FAISS index from several gRPC worker threads (FAISS releases the GIL);
    adding vectors may reallocate its inverted lists, so it must not overlap a search.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


def grown(buffer: npt.NDArray[Any], size: int, extra: int) -> npt.NDArray[Any]:
    """``buffer`` (``size`` rows used) with room for ``extra`` more rows: the same array when
    it has room, else a copy with 1/8 headroom (amortised O(1) per appended row)."""
    if size + extra <= len(buffer):
        return buffer
    capacity = size + extra + max(size // 8, 1024)
    bigger = np.empty((capacity, *buffer.shape[1:]), dtype=buffer.dtype)
    bigger[:size] = buffer[:size]
    return bigger


def float16_rescorer(store: npt.NDArray[np.float16], rows: int) -> faiss.IndexScalarQuantizer:
    """A FAISS float16 index over the first ``rows`` rows of ``store``, reading them in place.

    FAISS's ``IndexRefine`` re-scores a shortlist in C++ with SIMD float16 distances:
    at 1M items and d = 448, 2,000 rows in ~0.5 ms, against ~1.5 ms for decoding them to
    float32 and a BLAS product. Its codes would otherwise be a second copy of the table
    (896 MB at 1M items), so they are pointed at ``store``, which must stay alive and
    unmoved while the index is used (the caller holds both and swaps them together).
    FAISS's float16 code is the IEEE half, so the bytes are the same; the check below
    fails loudly if a FAISS release lays out its code vector differently."""
    if store.dtype != np.float16 or not store.flags.c_contiguous or rows > len(store):
        raise ValueError(f"need a C-contiguous float16 store of at least {rows} rows, got {store.dtype} {store.shape}")
    dimension = int(store.shape[1])
    rescorer = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    size = rows * dimension * 2
    pointer = faiss.swig_ptr(store.reshape(-1).view(np.uint8))
    # A MaybeOwnedVector (FAISS >= 1.10; the bundled type stub still says UInt8Vector): made a
    # view, which FAISS never frees.
    codes: Any = rescorer.codes
    codes.is_owned = False
    codes.view_data = pointer
    codes.view_size = size
    codes.c_ptr = pointer
    codes.c_size = size
    rescorer.ntotal = rows
    if rows and (codes.size() != size or faiss.rev_swig_ptr(codes.data(), 2).tobytes() != store[0, :1].tobytes()):
        raise RuntimeError("this FAISS release does not accept a float16 view of the item vectors")
    return rescorer


class VectorIndex:
    """Search over an ANN index with exclusions and exact re-scoring of the shortlist.

    Live updates (retrieval_service/updates.py): :meth:`add` appends vectors to the IVF
    lists and the float16 store without retraining; :meth:`retire` hides rows (deleted or
    replaced items) from every search. Rows are never renumbered.
    """

    def __init__(
        self,
        index: faiss.Index,
        vectors: npt.NDArray[np.float16],
        nprobe: int,
        refine_factor: int = REFINE_FACTOR,
        max_rescored_rows: int | None = None,
    ) -> None:
        if index.ntotal != len(vectors):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(vectors)} item vectors were given")
        if vectors.ndim != 2 or vectors.shape[1] != index.d:
            raise ValueError(f"index has dimension {index.d} but the item vectors have shape {vectors.shape}")
        self._index = index
        # The float16 store grows in place (spare capacity beyond _size); readers use the view.
        if not vectors.flags.c_contiguous or not vectors.flags.writeable:
            vectors = np.array(vectors, dtype=np.float16, order="C")
        self._store = vectors
        self._vectors = vectors
        self._size = len(vectors)
        self._base_size = len(vectors)
        # Float32 copies of the rows added since loading (scored exactly; see EXACT_FRESH_ROWS).
        self._fresh: npt.NDArray[np.float32] | None = np.zeros((0, vectors.shape[1]), dtype=np.float32)
        self._retired = np.zeros(0, dtype=np.int64)
        self._lock = ReadWriteLock()
        self._nprobe = nprobe
        self._refine_factor = refine_factor
        self._max_rescored_rows = max_rescored_rows
        self._is_ivf = faiss.try_extract_index_ivf(index) is not None
        if self._is_ivf:
            faiss.extract_index_ivf(index).nprobe = nprobe
        self._rescorer = float16_rescorer(vectors, len(vectors))
        # Shortlist from ``index`` (ID selectors apply there), re-scored by the float16 view.
        self._refined = faiss.IndexRefine(index, self._rescorer)
        # FAISS decodes float16 with SIMD (the vectors of an answer): faster than numpy's astype.
        self._decoder = faiss.ScalarQuantizer(int(vectors.shape[1]), faiss.ScalarQuantizer.QT_fp16)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @property
    def refine_factor(self) -> int:
        return self._refine_factor

    def set_refine_factor(self, refine_factor: int) -> None:
        """Shortlist = refine_factor x n candidates from the IVF-PQ, re-scored exactly."""
        self._refine_factor = refine_factor

    def shortlist_size(self, n: int) -> int:
        """IVF-PQ rows re-scored exactly for an answer of ``n``: refine_factor x n, at most
        max(n, max_rescored_rows) (None: no cap)."""
        rows = n * self._refine_factor
        if self._max_rescored_rows is not None:
            rows = min(rows, max(n, self._max_rescored_rows))
        return rows

    def set_nprobe(self, nprobe: int) -> None:
        """Lists probed per search (IVF only; a flat index ignores it)."""
        self._nprobe = nprobe
        if self._is_ivf:
            faiss.extract_index_ivf(self._index).nprobe = nprobe

    @property
    def size(self) -> int:
        """Rows in the index, retired ones included (row ids run 0..size-1)."""
        return self._size

    @property
    def retired_rows(self) -> npt.NDArray[np.int64]:
        """Rows no search returns (deleted or replaced items), sorted."""
        return self._retired

    def add(
        self, vectors: npt.NDArray[np.float32], retire: npt.NDArray[np.int64] | None = None
    ) -> npt.NDArray[np.int64]:
        """Append ``vectors`` (k, d) as new rows and retire the rows ``retire``, in one step no
        search sees half of; returns the new rows. The IVF lists are not retrained."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"vectors have shape {vectors.shape}; this index has dimension {self.dimension}")
        with self._lock.writing():
            start = self._size
            store = grown(self._store, start, len(vectors))
            store[start : start + len(vectors)] = vectors.astype(np.float16)
            self._store = store
            # The store view grows before FAISS does: a row FAISS returns always has its vector.
            self._vectors = store[: start + len(vectors)]
            fresh = self._fresh
            if fresh is not None:
                added = start - self._base_size
                if added + len(vectors) <= EXACT_FRESH_ROWS:
                    fresh = grown(fresh, added, len(vectors))
                    # The values the float16 store holds, so both scorings agree.
                    fresh[added : added + len(vectors)] = vectors.astype(np.float16).astype(np.float32)
                    self._fresh = fresh
                else:
                    self._fresh = None  # too many for exact scoring: the IVF lists alone
            self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            self._size = int(self._index.ntotal)
            # The store may have moved (grown): point a new re-scorer at it, under the lock.
            self._rescorer = float16_rescorer(store, self._size)
            self._refined = faiss.IndexRefine(self._index, self._rescorer)
            if retire is not None and len(retire):
                self._retired = np.union1d(self._retired, retire.astype(np.int64))
        return np.arange(start, start + len(vectors), dtype=np.int64)

    def retire(self, rows: npt.NDArray[np.int64]) -> None:
        """Hide ``rows`` from every search from now on."""
        with self._lock.writing():
            self._retired = np.union1d(self._retired, rows.astype(np.int64))

    @property
    def dimension(self) -> int:
        return int(self._index.d)

    @property
    def vectors(self) -> npt.NDArray[np.float16]:
        return self._vectors

    def decoded(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The stored vectors of ``rows`` as float32."""
        if not len(rows):
            return np.zeros((0, self.dimension), dtype=np.float32)
        codes = np.ascontiguousarray(self._vectors[rows]).view(np.uint8)
        decoded: npt.NDArray[np.float32] = self._decoder.decode(codes)
        return decoded

    def vector(self, row: int) -> npt.NDArray[np.float32]:
        return np.asarray(self._vectors[row], dtype=np.float32)

    def search(
        self, query: npt.NDArray[np.float32], n: int, exclude_rows: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Best ``n`` rows for one query (shape (1, d)); excluded and retired rows never returned."""
        with self._lock.reading():
            return self._search(query, n, exclude_rows)

    def search_with_vectors(
        self, query: npt.NDArray[np.float32], n: int, exclude_rows: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """:meth:`search`, and the stored vectors of the rows found (float32), read under the
        same lock so they are the vectors that were scored."""
        with self._lock.reading():
            rows, scores = self._search(query, n, exclude_rows)
            return rows, scores, self.decoded(rows)

    def _refined_search(
        self, query: npt.NDArray[np.float32], n: int, shortlist: int, selector: faiss.IDSelector | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The best ``n`` of a ``shortlist`` from the ANN index, re-scored exactly from float16."""
        base = faiss.SearchParametersIVF() if self._is_ivf else faiss.SearchParameters()
        if isinstance(base, faiss.SearchParametersIVF):
            base.nprobe = self._nprobe
        if selector is not None:
            base.sel = selector
        params = faiss.IndexRefineSearchParameters()
        params.base_index_params = base  # a raw pointer: ``base`` lives until the search returns
        params.k_factor = (shortlist + 0.5) / n  # FAISS shortlists int(n x k_factor) rows
        scores, found = self._refined.search(np.ascontiguousarray(query, dtype=np.float32), n, params=params)
        kept = found[0] >= 0
        return found[0][kept].astype(np.int64), scores[0][kept].astype(np.float32)

    def _search(
        self, query: npt.NDArray[np.float32], n: int, exclude_rows: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        retired = self._retired
        if exclude_rows is None or not len(exclude_rows):
            exclude = retired if len(retired) else None
        else:
            exclude = np.union1d(exclude_rows.astype(np.int64), retired)
        size = self._size
        available = size - (len(exclude) if exclude is not None else 0)
        n = min(n, available)
        if n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        shortlist = min(size, self.shortlist_size(n) if self._is_ivf else n)
        # Both objects must stay referenced until the search returns (SWIG holds raw pointers).
        excluded_ids = faiss.IDSelectorBatch(exclude.astype(np.int64)) if exclude is not None else None
        selector = faiss.IDSelectorNot(excluded_ids) if excluded_ids is not None else None
        rows, scores = self._refined_search(query, n, shortlist, selector)
        fresh_vectors = self._fresh
        if self._is_ivf and fresh_vectors is not None and size > self._base_size:
            # Rows added since loading are all scored exactly (their float32 copies); the best
            # n of them replace whichever the IVF lists happened to find.
            fresh_scores = fresh_vectors[: size - self._base_size] @ query[0].astype(np.float32)
            fresh_rows = np.arange(self._base_size, size, dtype=np.int64)
            if exclude is not None:
                kept = ~np.isin(fresh_rows, exclude)
                fresh_rows, fresh_scores = fresh_rows[kept], fresh_scores[kept]
            if len(fresh_rows) > n:
                top = np.argpartition(-fresh_scores, n - 1)[:n]
                fresh_rows, fresh_scores = fresh_rows[top], fresh_scores[top]
            from_lists = rows < self._base_size
            rows = np.concatenate([rows[from_lists], fresh_rows])
            scores = np.concatenate([scores[from_lists], fresh_scores.astype(np.float32)])
            best = np.argsort(-scores, kind="stable")[:n]
            rows, scores = rows[best], scores[best]
        return rows, scores

    def search_allowed(
        self, query: npt.NDArray[np.float32], n: int, allowed: npt.NDArray[np.bool_], exact_below: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Best ``n`` rows among the rows where ``allowed`` is true (a filter with the exclusions
        already removed). The IVF-PQ search is restricted by an ID selector; when fewer than
        ``exact_below`` rows are allowed, or the probed lists hold fewer than ``n`` of them,
        the allowed rows are scored exactly instead (brute force over them: exact and cheap)."""
        with self._lock.reading():  # FAISS must not add to the lists during a search
            return self._search_allowed(query, n, allowed, exact_below)

    def _search_allowed(
        self, query: npt.NDArray[np.float32], n: int, allowed: npt.NDArray[np.bool_], exact_below: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        if len(self._retired):
            allowed = allowed.copy()
            allowed[self._retired[self._retired < len(allowed)]] = False
        matching = np.flatnonzero(allowed).astype(np.int64)
        n = min(n, len(matching))
        if n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self._is_ivf and len(matching) >= exact_below:
            # The bitmap and the selector must stay referenced until the search returns.
            bitmap = np.packbits(allowed.astype(np.uint8), bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            rows, scores = self._refined_search(query, n, min(len(matching), self.shortlist_size(n)), selector)
            if len(rows) >= n:
                return rows, scores
        scores = (self.decoded(matching) @ query[0].astype(np.float32)).astype(np.float32)
        top = np.argpartition(-scores, n - 1)[:n] if n < len(matching) else np.arange(len(matching))
        best = top[np.argsort(-scores[top], kind="stable")]
        return matching[best], scores[best]

    def exact_search(self, queries: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
        """Exact top ``n`` rows per query (brute force), the reference for recall."""
        scores = queries.astype(np.float32) @ self._vectors.astype(np.float32).T
        n = min(n, self.size)
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        return np.asarray(top, dtype=np.int64)


def recall_against_exact(index: VectorIndex, queries: npt.NDArray[np.float32], n: int) -> float:
    """Mean share of the exact top ``n`` that the served search returns."""
    exact = index.exact_search(queries, n)
    hits = 0
    for row, query in enumerate(queries):
        found, _ = index.search(query[None, :], n)
        hits += len(np.intersect1d(found, exact[row]))
    recall = hits / float(exact.size) if exact.size else 1.0
    event(log, "recall measured", n=n, queries=len(queries), recall=round(recall, 4))
    return recall
