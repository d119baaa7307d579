"""Cost of live catalogue updates on the index: ``python -m benchmarks.catalog_updates``.

Times, on random unit vectors (100 000 x 448, IVF1024,PQ56, nprobe 16, one thread): a search
before any update, ``VectorIndex.add`` of 1 and 100 vectors, a search with the 2 200 added
rows (scored exactly, see ``EXACT_FRESH_ROWS``), then with 2 000 rows retired too, a
write-ahead-log append with and without fsync, and, when ``redis-server`` is installed, an
append to the shared log in Redis (append-only file fsynced on every write) and the time
until another replica's follower has it. docs/catalog-updates.md quotes it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from retrieval_service.index import IndexLayout, VectorIndex, build_index
from retrieval_service.update_log import OP_UPSERT, RedisLogStore, WalRecord, WriteAheadLog
from shared.config import SharedUpdateLogSettings
from shared.errors import Unavailable

ITEMS, DIMENSION, QUERIES = 100_000, 448, 300
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def _percentiles(call: Callable[[int], object], repeats: int) -> str:
    timings = []
    for repeat in range(repeats):
        started = time.perf_counter()
        call(repeat)
        timings.append(time.perf_counter() - started)
    p50, p99 = np.percentile(timings, [50, 99]) * 1000.0
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def _appender(wal: WriteAheadLog, body: dict[str, object]) -> Callable[[int], object]:
    return lambda _: wal.append(WalRecord(wal.last_sequence + 1, OP_UPSERT, 0, body))


def main() -> None:
    # As the retrieval server runs (retrieval.search_threads = 1): FAISS and numpy's BLAS.
    faiss.omp_set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ITEMS, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    layout = IndexLayout(kind="ivfpq", dimension=DIMENSION, nlist=1024, pq_m=56, pq_nbits=8)
    index = VectorIndex(build_index(vectors, layout, 7, 40_000, 8, opq_iterations=8), vectors.astype(np.float16), 16, 3)
    queries = vectors[:QUERIES] + 0.1 * rng.standard_normal((QUERIES, DIMENSION)).astype(np.float32)

    def search(repeat: int) -> object:
        return index.search(queries[repeat % QUERIES][None, :], 300)

    print("search n=300:", _percentiles(search, QUERIES))
    print("add 1 vector:", _percentiles(lambda _: index.add(rng.standard_normal((1, DIMENSION), np.float32)), 200))
    print("add 100 vectors:", _percentiles(lambda _: index.add(rng.standard_normal((100, DIMENSION), np.float32)), 20))
    print(f"search n=300, {index.size - ITEMS} fresh rows (scored exactly):", _percentiles(search, QUERIES))
    index.retire(np.arange(2000, dtype=np.int64))
    print("search n=300, and 2000 rows retired:", _percentiles(search, QUERIES))
    body: dict[str, object] = {"items": [{"item_id": "x", "vector": "A" * 1024}]}
    with tempfile.TemporaryDirectory() as directory:
        for fsync in (True, False):
            wal, _ = WriteAheadLog.open(Path(directory) / f"wal-{fsync}.jsonl", fsync)
            print(f"WAL append (fsync={fsync}):", _percentiles(_appender(wal, body), 200))
            wal.close()
    _shared_log(body, 200)


def _shared_log(body: dict[str, object], repeats: int) -> None:
    """Append to a Redis stream log and time how long a follower (another replica) takes to see it."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("shared log: redis-server is not installed, not measured")
        return
    with tempfile.TemporaryDirectory() as directory:
        socket_path = f"{directory}/redis.sock"
        server = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", socket_path, "--save", "", "--dir", directory, *DURABLE],
            stdout=subprocess.DEVNULL,
        )
        try:
            store = RedisLogStore(SharedUpdateLogSettings(redis_url=f"unix://{socket_path}", socket_timeout_s=2), True)
            deadline = time.monotonic() + 10
            while True:
                try:
                    writer, _ = store.open("bench", "v1", None)
                    break
                except Unavailable:  # the server is still starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            follower, _ = store.open("bench", "v1", None)
            seen: dict[int, float] = {}

            def follow() -> None:
                last = 0
                while last < repeats:
                    for record in follower.wait_records_after(last, 1.0):
                        seen[record.sequence] = time.perf_counter()
                        last = record.sequence

            thread = threading.Thread(target=follow)
            thread.start()
            appended: dict[int, float] = {}
            appends = []
            for sequence in range(1, repeats + 1):
                started = time.perf_counter()
                writer.append(WalRecord(sequence, OP_UPSERT, 0, body))
                appends.append(time.perf_counter() - started)
                appended[sequence] = started
                time.sleep(0.005)
            thread.join(10)
            delays = [seen[sequence] - appended[sequence] for sequence in appended if sequence in seen]
            for label, values in (("append (fsync always)", appends), ("append -> follower has it", delays)):
                p50, p99 = np.percentile(values, [50, 99]) * 1000.0
                print(f"shared log in Redis, {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            writer.close()
            follower.close()
            store.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
