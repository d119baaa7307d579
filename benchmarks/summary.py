"""The issue's targets checked against a result, and the markdown section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import table
from ranking_service.features import FEATURE_NAMES
from shared.config import VitrineSettings

SATURATION_P99_MS = 50.0
SATURATION_RPS = 300.0
RATE_FOR_TARGET = 100.0
P50_TARGET_MS = 5.0
P99_TARGET_MS = 15.0
SERVED_OVER_FLOOR = 1.3
RETRIEVAL_RSS_MB = 1.5 * 1024
RANKING_START_S = 10.0
BUILD_S = 600.0


def _phase(payload: dict[str, Any], rate: float | None) -> dict[str, Any] | None:
    for phase in payload.get("phases", []):
        if rate is None and phase.get("concurrency") and not str(phase.get("phase")).startswith("warm-up"):
            return dict(phase)
        if rate is not None and phase.get("target_rps") == rate:
            return dict(phase)
    return None


def targets(payload: dict[str, Any], settings: VitrineSettings) -> list[dict[str, Any]]:
    tuning = settings.index_build.tuning
    rows: list[dict[str, Any]] = []

    def add(target: str, value: str, met: bool) -> None:
        rows.append({"target": target, "value": value, "met": bool(met)})

    choice = payload.get("index", {}).get("choice", {})
    if choice:
        add(
            f"index: recall@{tuning.recall_at} >= {tuning.target_recall}, <= {tuning.max_latency_ms} ms, "
            f"<= {tuning.max_bytes_per_item:g} B/item (autotuner's choice)",
            f"{choice['layout']} nprobe {choice['nprobe']}: recall {choice['recall']}, p50 {choice['p50_ms']:.2f} ms, "
            f"p99 {choice['p99_ms']:.2f} ms, {choice['bytes_per_item']:g} B/item",
            choice["meets_target"],
        )
    served = payload.get("index", {}).get("served_choice", {})
    if served:
        add(
            "index as served (IVF-PQ + float16 re-score): recall and latency",
            f"{served['layout']} nprobe {served['nprobe']}: recall {served['recall']}, p50 {served['p50_ms']:.2f} ms, "
            f"{served['bytes_per_item']:g} B/item",
            served["recall"] >= tuning.target_recall and served["p50_ms"] <= tuning.max_latency_ms,
        )
    artifacts = payload.get("artifacts")
    if artifacts:
        add(
            "index build < 10 min for 1M items", f"{artifacts['index_build_s']} s", artifacts["index_build_s"] < BUILD_S
        )
    at_rate = _phase(payload, RATE_FOR_TARGET)
    if at_rate:
        add(
            f"p50 <= {P50_TARGET_MS} ms at {RATE_FOR_TARGET:g} QPS",
            f"{at_rate['p50_ms']} ms",
            at_rate["p50_ms"] <= P50_TARGET_MS and not at_rate["errors"],
        )
        add(
            f"p99 <= {P99_TARGET_MS} ms at {RATE_FOR_TARGET:g} QPS",
            f"{at_rate['p99_ms']} ms",
            at_rate["p99_ms"] <= P99_TARGET_MS and not at_rate["errors"],
        )
    saturation = _phase(payload, None)
    if saturation:
        add(
            f">= {SATURATION_RPS:g} QPS at saturation with p99 <= {SATURATION_P99_MS:g} ms",
            f"{saturation['throughput_rps']} QPS, p99 {saturation['p99_ms']} ms",
            saturation["throughput_rps"] >= SATURATION_RPS and saturation["p99_ms"] <= SATURATION_P99_MS,
        )
    floor = payload.get("floor")
    lowest = _phase(payload, min(settings.bench.rates)) if payload.get("phases") else None
    if floor and lowest:
        ratio = lowest["p50_ms"] / floor["p50_ms"]
        add(
            f"served p50 <= {SERVED_OVER_FLOOR} x floor p50 (at {lowest['target_rps']:g} QPS)",
            f"{lowest['p50_ms']} / {floor['p50_ms']} ms = {ratio:.2f}x",
            ratio <= SERVED_OVER_FLOOR,
        )
    services = payload.get("services")
    if services:
        retrieval_rss = services["retrieval"]["after_load"]["peak_rss_mb"]
        add("retrieval RSS <= 1.5 GB at 1M items", f"{retrieval_rss} MiB (peak)", retrieval_rss <= RETRIEVAL_RSS_MB)
        start = services["ranking"]["start_s"]
        add("ranking start-up <= 10 s", f"{start} s", start <= RANKING_START_S)
    return rows


def _index_tables(index: dict[str, Any]) -> str:
    header = ["layout", "B/item", "build s", *[f"nprobe {p['nprobe']}" for p in index["layouts"][0]["points"]]]
    rows = []
    for layout in index["layouts"]:
        cells = [f"{p['recall']:.3f} / {p['p50_ms']:.2f} / {p['p99_ms']:.2f}" for p in layout["points"]]
        rows.append([f"`{layout['layout']}`", f"{layout['bytes_per_item']:g}", layout["build_s"], *cells])
    return table(header, rows)


def summarise(payload: dict[str, Any], settings: VitrineSettings, plot: Path) -> str:
    bench, machine = payload["bench"], payload["machine"]
    index = payload["index"]
    lines = [
        "## `make bench`: index, end to end, floor",
        "",
        f"Run `{payload['command']}` — {machine['date']}, {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, Python {machine['python']}; load average at start "
        f"{machine['load_average_at_start']} (the machine is shared: figures are noisy). "
        f"Whole run {payload.get('total_s', payload.get('index_s'))} s. Raw figures: "
        f"`benchmarks/results/{payload['name']}.json`.",
        "",
        "### Targets",
        "",
        table(
            ["target", "measured", "met"],
            [[t["target"], t["value"], "yes" if t["met"] else "**no**"] for t in payload["targets"]],
        ),
        "",
        "### Index",
        "",
        f"Synthetic catalogue: {index['items']:,} items of dimension {index['dimension']} "
        f"({bench['content_dim']} content, unit length, around {bench['clusters']} clusters; "
        f"{bench['collaborative_dim']} collaborative with log-normal norms, {bench['cold_share']:.0%} cold items "
        f"with a zero half), {index['queries']} history queries built as the server builds them. "
        f"Exact search (reference): {index['exact_batch_s']} s for all queries on all cores, "
        f"{index['exact_p50_ms']} ms per query on one thread. Coarse quantiser (k-means on "
        f"{index['train_sample']:,} vectors + assigning all items), shared by the layouts: {index['coarse_s']} s.",
        "",
        f"Cells: recall@{index['recall_at']} vs exact / p50 ms / p99 ms, one query at a time on ONE FAISS thread "
        f"(`faiss.omp_set_num_threads(1)`). B/item = codes + refine vectors (IVF list ids add 8). "
        f"`R...` layouts re-score a {bench['refine_factor']}× shortlist.",
        "",
        _index_tables(index),
        "",
        f"![recall/latency]({plot.as_posix()})",
        "",
        f"Autotuner (`retrieval_service/tuning.py`, settings `index_build.tuning`): **{index['choice'].get('layout')}"
        f" nprobe {index['choice'].get('nprobe')}** — {index['choice'].get('reason')}. Among layouts the server can "
        f"serve today (IVF-PQ + float16 re-score): **{index.get('served_choice', {}).get('layout')} nprobe "
        f"{index.get('served_choice', {}).get('nprobe')}**.",
    ]
    if "phases" in payload:
        artifacts, services, floor = payload["artifacts"], payload["services"], payload["floor"]
        lines += [
            "",
            "### End to end",
            "",
            f"Both services as processes on loopback (`python -m shared.cli serve ...`), serving the 1M-item "
            f"artifacts: index `{artifacts['index_layout']}` built in {artifacts['index_build_s']} s (training on a "
            f"sample), nprobe {artifacts['index_nprobe']} and a {artifacts['index_refine_factor']}× re-scored "
            f"shortlist chosen by the build's autotuner (recall "
            f"{artifacts['index_recall']}, recorded in the manifest, used by the server); ranker: LightGBM "
            f"LambdaMART, {artifacts['ranker_trees']} trees × {settings.ranker_build.num_leaves} leaves, trained in "
            f"{artifacts['ranker_train_s']} s on {bench['ranker_requests']} synthetic requests (candidates and "
            f"features through the serving code). Each `Recommend`: history of a known user → {bench['candidates']} "
            f"candidates → {len(FEATURE_NAMES)} features → LightGBM → rules → top {bench['k']}. "
            f"Load: asyncio `grpc.aio` client in the bench process (same 2 cores), open loop at fixed rates for "
            f"{bench['phase_seconds']:g} s, then a "
            f"closed loop of {bench['saturation_concurrency']} callers.",
            "",
            table(
                [
                    "phase",
                    "sent",
                    "ok",
                    "errors",
                    "throughput/s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "max ms",
                    "load generator CPU ms/request",
                ],
                [
                    [
                        p["phase"],
                        p["sent"],
                        p["ok"],
                        p["errors"] or 0,
                        p["throughput_rps"],
                        p["p50_ms"],
                        p["p95_ms"],
                        p["p99_ms"],
                        p["max_ms"],
                        p.get("client_cpu_ms_per_request", "-"),
                    ]
                    for p in payload["phases"]
                ],
            ),
            "",
            table(
                ["process", "start-up s (to SERVING)", "RSS MiB after warm-up", "peak RSS MiB after load"],
                [[name, s["start_s"], s["rss_mb"], s["after_load"]["peak_rss_mb"]] for name, s in services.items()],
            ),
            "",
            "### Floor (same stages in-process, no gRPC)",
            "",
            f"{floor['requests']} requests one after another in one process (Retriever → RankingPipeline), "
            f"one thread for search and predict: p50 {floor['p50_ms']} ms, p95 {floor['p95_ms']} ms, "
            f"p99 {floor['p99_ms']} ms, {floor['throughput_rps']} requests/s. Mean per stage (ms): "
            f"{floor['stage_mean_ms']}.",
        ]
        cap = payload.get("rescore_cap_lever")
        if cap:
            capped, uncapped = cap["capped"], cap["uncapped"]
            recall = next(key for key in capped if key.startswith("recall@"))
            lines += [
                "",
                f"Lever — the re-score cap (`retrieval.max_rescored_rows`, served above), the index alone, one "
                f"thread, 100 history queries: {recall} {capped[recall]} from {capped['rescored_rows']:,} "
                f"re-scored rows at p50 {capped['p50_ms']} ms (p99 {capped['p99_ms']}); uncapped, "
                f"{uncapped[recall]} from {uncapped['rescored_rows']:,} rows at p50 {uncapped['p50_ms']} ms "
                f"(p99 {uncapped['p99_ms']}).",
            ]
        plain = payload.get("floor_lightgbm_predict")
        if plain:
            lines += [
                "",
                f"Lever — compiled trees (lleaves, `ranking.compiled_trees`, served above): with LightGBM's own "
                f"predict instead the floor is p50 {plain['p50_ms']} ms, p99 {plain['p99_ms']} ms, "
                f"{plain['throughput_rps']} requests/s, stages {plain['stage_mean_ms']}; "
                f"identical top-{bench['k']} answers in {payload['floor_identical_answers']} of "
                f"{plain['requests']} requests. The served ranking process had its compiled trees "
                f"({services['ranking']['compiled_trees']!r}) {services['ranking']['compiled_ready_s']} s after "
                "it was started (the first request starts compiling in the background; LightGBM answers until "
                "then).",
            ]
        lowest = _phase(payload, min(settings.bench.rates))
        saturation = _phase(payload, None)
        if lowest and saturation:
            lines += [
                "",
                f"Served / floor: p50 {lowest['p50_ms'] / floor['p50_ms']:.2f}× (at {lowest['target_rps']:g} QPS), "
                f"throughput {saturation['throughput_rps'] / floor['throughput_rps']:.2f}× (saturation vs the "
                "single-threaded floor).",
            ]
            paced = payload.get("floor_paced")
            if paced:
                lines += [
                    "",
                    f"Floor paced like the served phase ({paced['pace_rps']:g} requests/s, idle in between, "
                    f"{paced['requests']} requests): p50 {paced['p50_ms']} ms, p95 {paced['p95_ms']} ms, stages "
                    f"{paced['stage_mean_ms']}; served / paced floor: p50 "
                    f"{lowest['p50_ms'] / paced['p50_ms']:.2f}× (the target above compares with the back-to-back "
                    "floor).",
                ]
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"
