"""The index autotuner and the benchmark harness on a tiny catalogue (real FAISS, real gRPC)."""

from __future__ import annotations

from pathlib import Path

import faiss
import pytest

from benchmarks.e2e import (
    build_artifacts,
    floor,
    load_floor,
    recommend_queries,
    rescore_cap_lever,
    rss_mb,
    start_service,
)
from benchmarks.index_bench import plot, run_index_bench
from benchmarks.loadgen import closed_loop, open_loop
from benchmarks.report import BEGIN, END, update_doc
from benchmarks.synthetic import history_queries, make_catalogue, make_dataset
from retrieval_service.artifact import load_index_artifact
from retrieval_service.index import IndexLayout
from retrieval_service.tuning import Measurement, choose, parse_layout
from shared.config import BenchSettings, IndexBuildSettings, IndexTuningSettings, RankerBuildSettings, RankingSettings

TINY = BenchSettings(
    items=4000,
    users=200,
    events_per_user=10,
    clusters=100,
    queries=30,
    layouts=["IVF{nlist},PQ16x8", "IVF{nlist},PQ16x8,RFP16", "IVF{nlist},PQ56x4fs,RSQ8"],
    nlist=32,
    nprobes=[2, 8, 32],
    ranker_requests=30,
    candidates=100,
    k=10,
)


def test_layouts_parse_and_print_back() -> None:
    for text in ("IVF1024,PQ56x8", "OPQ56,IVF1024,PQ56x8,RSQ8", "IVF1024,PQ112x4fs", "PCA128,IVF256,PQ32x8,RFP16x10"):
        assert parse_layout(text).label == text
    assert parse_layout("IVF1024,PQ56,RSQ8").bytes_per_item(448) == 56 + 448
    with pytest.raises(ValueError, match="unknown index layout"):
        parse_layout("HNSW32")


def test_autotuner_picks_the_cheapest_setting_reaching_the_target() -> None:
    settings = IndexTuningSettings(target_recall=0.95, max_latency_ms=2.0, max_bytes_per_item=200)
    points = [
        Measurement("small", 8, 0.90, 0.2, 0.4, 56),  # too inaccurate
        Measurement("small", 64, 0.96, 2.5, 3.0, 56),  # accurate but too slow
        Measurement("medium", 16, 0.955, 0.6, 0.9, 112),  # the answer
        Measurement("medium", 32, 0.97, 1.0, 1.5, 112),  # as small, slower
        Measurement("large", 8, 0.99, 0.5, 0.8, 952),  # too big
    ]
    choice = choose(points, settings)
    assert (choice.measurement.layout, choice.measurement.nprobe, choice.meets_target) == ("medium", 16, True)
    # Nothing within the size budget reaches the target: the cheapest that does, flagged.
    bigger = choose([p for p in points if p.layout != "medium"], settings)
    assert (bigger.measurement.layout, bigger.meets_target) == ("large", False)
    # Nothing reaches it at all: the highest recall within the latency budget.
    unreachable = choose(points, settings.model_copy(update={"target_recall": 0.999}))
    assert (unreachable.measurement.layout, unreachable.meets_target) == ("large", False)


def test_autotuner_breaks_the_latency_budget_rather_than_serve_below_the_recall_floor() -> None:
    points = [
        Measurement("small", 8, 0.56, 0.2, 0.4, 56),  # a slow machine: only this fits the budget
        Measurement("small", 64, 0.96, 2.5, 3.0, 56),
        Measurement("medium", 32, 0.93, 1.0, 1.5, 112),
        Measurement("medium", 64, 0.955, 1.8, 2.5, 112),
    ]
    tight = IndexTuningSettings(target_recall=0.95, min_recall=0.9, max_latency_ms=0.3)
    # The fastest setting reaching the target, over budget and flagged.
    over = choose(points, tight)
    assert (over.measurement.layout, over.measurement.nprobe, over.meets_target) == ("medium", 64, False)
    assert "over the latency budget" in over.reason
    # Nothing reaches the target: the fastest setting above the floor.
    floor_only = choose(points[:1] + points[2:3], tight)
    assert (floor_only.measurement.layout, floor_only.measurement.nprobe) == ("medium", 32)
    # Nothing reaches the floor either: the highest recall measured.
    assert choose(points[:1], tight).measurement.recall == 0.56
    # A floor the budget's best meets: the budget holds.
    lenient = choose(points, tight.model_copy(update={"min_recall": 0.5}))
    assert (lenient.measurement.layout, lenient.measurement.nprobe) == ("small", 8)
    with pytest.raises(ValueError, match="lower min_recall"):
        IndexTuningSettings(target_recall=0.9, min_recall=0.95)


def test_build_records_the_tuned_nprobe_and_the_server_loader_uses_it(tmp_path: Path) -> None:
    catalogue = make_catalogue(TINY, seed=3)
    settings = IndexBuildSettings(train_sample=2000, train_iterations=5)
    fused = catalogue.fused(settings)
    queries = history_queries(catalogue, fused, TINY.queries, settings, seed=4)
    layout = IndexLayout(kind="ivfpq", dimension=fused.shape[1], nlist=32, pq_m=16, pq_nbits=8)
    dataset = make_dataset(catalogue, TINY, seed=3)
    built = build_artifacts(
        tmp_path, catalogue, fused, dataset, queries, layout, settings, RankerBuildSettings(num_trees=20), TINY
    )
    loaded = load_index_artifact(tmp_path)  # nprobe from the manifest
    assert loaded.index.nprobe == built.index_nprobe
    assert loaded.index.refine_factor == built.index_refine_factor
    assert load_index_artifact(tmp_path, nprobe=3).index.nprobe == 3
    assert built.index_recall >= settings.tuning.target_recall


def test_index_grid_and_plot(tmp_path: Path) -> None:
    catalogue = make_catalogue(TINY, seed=5)
    settings = IndexBuildSettings()
    fused = catalogue.fused(settings)
    queries = history_queries(catalogue, fused, TINY.queries, settings, seed=6)
    result, grid = run_index_bench(fused, queries, TINY, settings.tuning, 2000, 5, seed=5)
    faiss.omp_set_num_threads(1)
    assert [layout.layout for layout in result.layouts] == [
        "IVF32,PQ16x8",
        "IVF32,PQ16x8,RFP16",
        "IVF32,PQ56x4fs,RSQ8",
    ]
    for layout in result.layouts:
        recalls = [point.recall for point in layout.points]
        assert all(0 <= recall <= 1 for recall in recalls)
        assert recalls[-1] >= recalls[0]  # more lists probed never finds less here
    # Re-scoring from float16 beats the bare codes it re-scores.
    assert result.layouts[1].points[-1].recall > result.layouts[0].points[-1].recall
    assert result.choice["layout"]
    assert result.served_choice["layout"] == "IVF32,PQ16x8,RFP16"
    assert grid.base(parse_layout("IVF32,PQ16x8")).ntotal == TINY.items
    plot(result, settings.tuning, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_harness_serves_loads_and_measures_the_floor(tmp_path: Path) -> None:
    catalogue = make_catalogue(TINY, seed=8)
    settings = IndexBuildSettings(train_sample=2000, train_iterations=5)
    fused = catalogue.fused(settings)
    queries = history_queries(catalogue, fused, TINY.queries, settings, seed=9)
    dataset = make_dataset(catalogue, TINY, seed=8)
    layout = IndexLayout(kind="ivfpq", dimension=fused.shape[1], nlist=32, pq_m=16, pq_nbits=8)
    root = tmp_path / "artifacts"
    built = build_artifacts(
        root, catalogue, fused, dataset, queries, layout, settings, RankerBuildSettings(num_trees=20), TINY
    )
    load = recommend_queries(dataset, 40, TINY.k, built.snapshot_at, seed=1)
    retrieval = start_service(
        "retrieval",
        ["--artifacts", str(root), "--metrics-port", "0"],
        {"VITRINE_RETRIEVAL__TEXT_QUERIES": "false"},
        tmp_path,
    )
    try:
        ranking = start_service(
            "ranking",
            ["--artifacts", str(root), "--retrieval", f"127.0.0.1:{retrieval.port}", "--metrics-port", "0"],
            {"VITRINE_RANKING__CANDIDATES": str(TINY.candidates)},
            tmp_path,
        )
        try:
            target = f"127.0.0.1:{ranking.port}"
            fixed = open_loop(target, load, rate=40.0, seconds=0.5, max_requests=15)
            saturated = closed_loop(target, load, concurrency=4, seconds=0.5, max_requests=30)
            memory = rss_mb(retrieval.process.pid)
        finally:
            ranking.stop()
    finally:
        retrieval.stop()
    assert fixed.sent == fixed.ok == 15
    assert not fixed.errors
    assert 0 < fixed.p50_ms <= fixed.p99_ms
    assert saturated.ok > 0
    assert not saturated.errors
    assert saturated.throughput_rps > 0
    assert fixed.client_cpu_ms_per_request > 0
    assert memory["rss_mb"] > 0
    assert ranking.start_s > 0
    pipeline, _ = load_floor(root, RankingSettings(candidates=TINY.candidates))
    result, answers = floor(pipeline, load[:20], warm_up=5)
    assert len(answers) == 15
    assert result.backend == "lleaves"
    assert result.requests == 15
    assert result.p50_ms > 0
    assert "predict" in result.stage_mean_ms
    paced, paced_answers = floor(pipeline, load[:10], warm_up=5, pace_rps=50.0)
    assert paced.requests == 5
    assert paced.throughput_rps <= 5 / (4 / 50.0)  # four gaps of 20 ms at least
    assert paced_answers == answers[:5]
    # The re-score cap lever: the same search with fewer rows re-scored finds no more.
    n = TINY.candidates
    lever = rescore_cap_lever(root, queries[:10], n, max_rescored_rows=n)
    capped, uncapped = lever["capped"], lever["uncapped"]
    assert capped["rescored_rows"] == n < uncapped["rescored_rows"]
    assert 0 < capped[f"recall@{n}"] <= uncapped[f"recall@{n}"] <= 1
    assert capped["p50_ms"] > 0


def test_doc_section_replaced_between_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- loadtest:begin -->\nother\n<!-- loadtest:end -->\n")
    update_doc(doc, "first")
    update_doc(doc, "second")
    text = doc.read_text()
    assert "other" in text
    assert "second" in text
    assert "first" not in text
    assert text.count(BEGIN) == text.count(END) == 1
    assert text.count("loadtest:begin") == 1
