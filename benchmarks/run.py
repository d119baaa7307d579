"""``make bench``: index grid, end-to-end load on both services, and the in-process floor.

Run: ``python -m benchmarks.run --name NAME [--items N] [--skip-e2e]`` (settings: the
``bench`` section of :class:`shared.config.VitrineSettings`, env ``VITRINE_BENCH__*``).
Writes ``benchmarks/results/<name>.json``, ``docs/img/bench-recall-latency.png`` and the
``bench`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from benchmarks.e2e import (
    build_artifacts,
    floor,
    load_floor,
    recommend_queries,
    rescore_cap_lever,
    rss_mb,
    start_service,
    wait_for_log,
)
from benchmarks.index_bench import IndexBenchResult, plot, run_index_bench
from benchmarks.loadgen import closed_loop, open_loop
from benchmarks.report import machine, update_doc, write_json
from benchmarks.summary import summarise, targets
from benchmarks.synthetic import history_queries, make_catalogue, make_dataset
from ranking_service.artifact import load_ranker_artifact
from retrieval_service.index import IndexLayout
from retrieval_service.tuning import layout_spec, parse_layout
from shared.config import VitrineSettings, load_settings
from shared.data import Dataset
from shared.logs import configure_logging, event

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PLOT = Path("img/bench-recall-latency.png")
SEED = 7


def _served_layout(result: IndexBenchResult, dimension: int, fallback_nlist: int) -> IndexLayout:
    chosen = result.served_choice.get("layout") if result.served_choice else None
    spec = parse_layout(chosen) if chosen else parse_layout(f"OPQ56,IVF{fallback_nlist},PQ56x8,RFP16")
    return IndexLayout(
        kind="ivfpq",
        dimension=dimension,
        nlist=spec.nlist,
        pq_m=spec.pq_m,
        pq_nbits=spec.pq_nbits,
        opq=spec.transform == "OPQ",
        fast_scan=spec.fast_scan,
    )


def run(settings: VitrineSettings, name: str, workdir: Path, skip_e2e: bool, command: str) -> dict[str, Any]:
    bench = settings.bench
    started = time.perf_counter()
    payload: dict[str, Any] = {"name": name, "command": command, "machine": machine(), "bench": bench.model_dump()}
    index_build = settings.index_build.model_copy(update={"nlist": bench.nlist})
    catalogue = make_catalogue(bench, SEED)
    fused = catalogue.fused(index_build)
    queries = history_queries(catalogue, fused, bench.queries, index_build, SEED + 1)
    payload["data_s"] = round(time.perf_counter() - started, 1)
    event(log, "synthetic catalogue ready", items=len(fused), dimension=fused.shape[1], s=payload["data_s"])

    index_result, grid = run_index_bench(
        fused, queries, bench, index_build.tuning, bench.train_sample, bench.train_iterations, SEED
    )
    payload["index"] = index_result.describe()
    plot(index_result, index_build.tuning, ROOT / "docs" / PLOT)
    payload["index_s"] = round(time.perf_counter() - started, 1)
    gc.collect()
    if skip_e2e:
        return payload

    layout = _served_layout(index_result, int(fused.shape[1]), bench.nlist)
    spec = layout_spec(layout, refine="")
    # The served index is the grid's build of the chosen layout: its build time is the shared
    # coarse step plus that layout's own training and adding.
    served_index = grid.base(spec)
    build_s = sum(index_result.coarse_s.values()) + next(
        entry.build_s for entry in index_result.layouts if entry.layout == spec.label
    )
    index_build = index_build.model_copy(
        update={
            "nlist": layout.nlist,
            "pq_m": layout.pq_m,
            "opq_min_items": 0 if layout.opq else bench.items + 1,
            "fast_scan_min_items": 0 if layout.fast_scan else bench.items + 1,
            "train_sample": bench.train_sample,
            "train_iterations": bench.train_iterations,
        }
    )
    dataset = make_dataset(catalogue, bench, SEED)
    root = workdir / "artifacts"
    if root.is_symlink():
        # Removing it would leave the link and build into whatever it points at.
        raise SystemExit(f"{root} is a symbolic link; the bench rebuilds it: give --workdir a real directory")
    shutil.rmtree(root, ignore_errors=True)
    built = build_artifacts(
        root,
        catalogue,
        fused,
        dataset,
        queries,
        layout,
        index_build,
        settings.ranker_build,
        bench,
        served_index,
        build_s,
    )
    del grid, served_index
    payload["artifacts"] = built.__dict__ | {"root": str(built.root)}
    del fused, catalogue
    gc.collect()
    payload |= serve_and_floor(settings, root, dataset, built.snapshot_at, workdir, queries)
    payload["total_s"] = round(time.perf_counter() - started, 1)
    return payload


def reuse_artifacts(settings: VitrineSettings, name: str, workdir: Path, command: str) -> dict[str, Any]:
    """End to end and floor only, on the artifacts an earlier run left in ``workdir``
    (the index grid and the builds skipped; the synthetic data regenerated for the queries):
    before/after comparisons of serving code on the very same artifacts."""
    bench = settings.bench
    started = time.perf_counter()
    root = workdir / "artifacts"
    payload: dict[str, Any] = {
        "name": name,
        "command": command,
        "machine": machine(),
        "bench": bench.model_dump(),
        "artifacts": {"root": str(root), "reused": True},
    }
    dataset = make_dataset(make_catalogue(bench, SEED), bench, SEED)
    gc.collect()
    snapshot_at = load_ranker_artifact(root).snapshot_at
    payload |= serve_and_floor(settings, root, dataset, snapshot_at, workdir)
    payload["total_s"] = round(time.perf_counter() - started, 1)
    return payload


def serve_and_floor(
    settings: VitrineSettings,
    root: Path,
    dataset: Dataset,
    snapshot_at: int,
    workdir: Path,
    queries: npt.NDArray[np.float32] | None = None,
) -> dict[str, Any]:
    """Both services as processes under load, then the same stages in-process (the floor);
    with the index ``queries``, the re-score lever too."""
    bench = settings.bench
    payload: dict[str, Any] = {}
    ranking_settings = settings.ranking.model_copy(update={"candidates": bench.candidates, "predict_threads": 1})
    load_queries = recommend_queries(dataset, bench.max_requests_per_phase, bench.k, snapshot_at, SEED + 2)
    floor_queries = load_queries[: bench.floor_requests + bench.warm_up_requests]
    common_env = {"VITRINE_RETRIEVAL__RELOAD_POLL_S": "0", "VITRINE_RANKING__RELOAD_POLL_S": "0"}
    retrieval = start_service(
        "retrieval",
        ["--artifacts", str(root), "--metrics-port", "0"],
        {**common_env, "VITRINE_RETRIEVAL__TEXT_QUERIES": "false", "VITRINE_RETRIEVAL__MAX_CANDIDATES": "1000"},
        workdir,
    )
    ranking = None
    try:
        ranking = start_service(
            "ranking",
            ["--artifacts", str(root), "--retrieval", f"127.0.0.1:{retrieval.port}", "--metrics-port", "0"],
            {
                **common_env,
                "VITRINE_RANKING__CANDIDATES": str(bench.candidates),
                "VITRINE_RANKING__PREDICT_THREADS": "1",
            },
            workdir,
        )
        target = f"127.0.0.1:{ranking.port}"
        # The first request starts compiling the trees in the background; measure with them.
        warm = closed_loop(target, load_queries, 2, 60.0, bench.warm_up_requests)
        compiled, compiled_s = wait_for_log(ranking, ("compiled ranker ready", "compiled ranker unavailable"), 600.0)
        services: dict[str, Any] = {
            "retrieval": {"start_s": retrieval.start_s, **rss_mb(retrieval.process.pid)},
            "ranking": {
                "start_s": ranking.start_s,
                "compiled_trees": compiled,
                "compiled_ready_s": compiled_s,
                **rss_mb(ranking.process.pid),
            },
        }
        phases = [warm.describe() | {"phase": "warm-up (while compiling)"}]
        for rate in bench.rates:
            phases.append(
                open_loop(target, load_queries, rate, bench.phase_seconds, bench.max_requests_per_phase).describe()
            )
            event(log, "phase done", **phases[-1])
        phases.append(
            closed_loop(
                target, load_queries, bench.saturation_concurrency, bench.phase_seconds, bench.max_requests_per_phase
            ).describe()
        )
        event(log, "phase done", **phases[-1])
        services["retrieval"] |= {"after_load": rss_mb(retrieval.process.pid)}
        services["ranking"] |= {"after_load": rss_mb(ranking.process.pid)}
        payload["services"] = services
        payload["phases"] = phases
    finally:
        if ranking is not None:
            ranking.stop()
        retrieval.stop()

    floors = {}
    answers = {}
    # Lever: compiled trees (the served configuration) against LightGBM's own predict.
    for compiled_trees in (True, False):
        pipeline, load_s = load_floor(root, ranking_settings.model_copy(update={"compiled_trees": compiled_trees}))
        result, answers[compiled_trees] = floor(pipeline, floor_queries, bench.warm_up_requests)
        if compiled_trees and queries is not None:
            payload["rescore_cap_lever"] = rescore_cap_lever(
                root, queries[:100], bench.candidates, settings.retrieval.max_rescored_rows
            )
        result.load_s = round(load_s, 2)
        floors[compiled_trees] = result.__dict__
        event(log, "floor done", **result.__dict__)
        if compiled_trees:
            # The floor paced like the lowest served rate: how much of served / floor is the
            # idle time between requests rather than the serving path.
            rate = min(bench.rates)
            count = min(int(rate * bench.phase_seconds), bench.floor_requests)
            paced, _ = floor(pipeline, floor_queries[: bench.warm_up_requests + count], bench.warm_up_requests, rate)
            payload["floor_paced"] = paced.__dict__ | {"pace_rps": rate}
            event(log, "paced floor done", **payload["floor_paced"])
        del pipeline
        gc.collect()
    payload["floor"] = floors[True]
    payload["floor_lightgbm_predict"] = floors[False]
    payload["floor_identical_answers"] = sum(a == b for a, b in zip(answers[True], answers[False], strict=True))
    faiss.omp_set_num_threads(2)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="bench", help="result name: benchmarks/results/<name>.json")
    parser.add_argument("--items", type=int, default=None, help="catalogue size (default: bench.items)")
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"), help="artifacts and service logs")
    parser.add_argument("--skip-e2e", action="store_true", help="index grid only")
    parser.add_argument(
        "--reuse-artifacts",
        action="store_true",
        help="end to end and floor only, on the artifacts of an earlier run in WORKDIR/artifacts (no docs update)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--docs-only", action="store_true", help="re-render docs/benchmarks.md from benchmarks/results/<name>.json"
    )
    args = parser.parse_args(argv)
    if args.docs_only:
        settings = load_settings()
        payload = json.loads((ROOT / "benchmarks" / "results" / f"{args.name}.json").read_text())
        update_doc(ROOT / "docs" / "benchmarks.md", summarise(payload, settings, PLOT))
        return 0
    settings = load_settings(bench={"items": args.items})
    configure_logging(settings.log_level)
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "make bench" if args.name == "bench" else "python -m benchmarks.run " + " ".join(sys.argv[1:])
    if args.reuse_artifacts:
        payload = reuse_artifacts(settings, args.name, args.workdir, command)
        write_json(ROOT / "benchmarks" / "results" / f"{args.name}.json", payload)
        print(json.dumps({"phases": payload["phases"], "floor": payload["floor"]}, indent=1))
        return 0
    payload = run(settings, args.name, args.workdir, args.skip_e2e, command)
    payload["targets"] = targets(payload, settings)
    write_json(ROOT / "benchmarks" / "results" / f"{args.name}.json", payload)
    if not args.no_docs:
        update_doc(ROOT / "docs" / "benchmarks.md", summarise(payload, settings, PLOT))
    for target in payload["targets"]:
        print(f"{'MET ' if target['met'] else 'NOT '} {target['target']}: {target['value']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
