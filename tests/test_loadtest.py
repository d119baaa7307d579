"""The load-test harness (deploy/loadtest/): a real locust run against the fixture servers,
and the results / markdown writer on records whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.loadtest.ids import LoadIds, ids_from_artifacts, read_ids, write_ids
from deploy.loadtest.results import (
    BEGIN_MARKER,
    END_MARKER,
    FLAG_DEGRADED,
    LoadTestReport,
    Machine,
    StageResult,
    describe_machine,
    find_saturation,
    markdown_section,
    read_report,
    saturation_sentence,
    summarise,
    update_docs,
    write_report,
)
from deploy.loadtest.runner import LoadTestError, run_scenarios
from deploy.loadtest.settings import LoadTestSettings, RpcMix, Scenario
from tests.conftest import TEST_DATA, BuiltArtifacts, Servers


def test_headless_run_against_real_servers(servers: Servers, artifacts: BuiltArtifacts, tmp_path: Path) -> None:
    scenario = Scenario(
        name="smoke",
        rpcs=RpcMix(recommend=0.6, similar_items=0.25, log_events=0.15),
        users=4,
        rate=40.0,
        duration_s=3.0,
        warmup_s=0.5,
    )
    settings = LoadTestSettings(
        target=f"127.0.0.1:{servers.ranking_server.port}",
        retrieval_target=f"127.0.0.1:{servers.retrieval_server.port}",
        artifacts=artifacts.root,
        scenarios=[scenario],
        run_dir=tmp_path,
        docs=None,
        timeout_s=5.0,
    )

    report = run_scenarios(settings, "pytest", "fixture servers")

    (result,) = report.scenarios
    # 40 req/s for 2.5 measured seconds; a busy shared machine may fall short, never to nothing.
    assert 20 <= result.requests <= 130, result
    assert result.errors == 0, result.errors_by_status
    assert result.errors_by_status == {}
    assert {rpc.rpc for rpc in result.per_rpc} == {"Recommend", "SimilarItems", "LogEvents"}
    assert all(rpc.requests > 0 and rpc.errors == 0 for rpc in result.per_rpc)
    assert result.degraded == 0
    assert result.partial == 0
    latency = result.latency
    assert latency is not None
    assert 0 < latency.p50 <= latency.p95 <= latency.p99 <= latency.max < settings.timeout_s * 1000
    assert 0 < result.throughput_rps <= 2 * scenario.rate  # type: ignore[operator]
    assert 0 < result.client_cpu_share < 1.5
    # Locust's own statistics saw the same calls, plus at most one per user still finishing at the stop.
    entries = json.loads((tmp_path / "smoke.locust.json").read_text())
    assert {entry["name"] for entry in entries} == {"Recommend", "SimilarItems", "LogEvents"}
    assert sum(entry["num_failures"] for entry in entries) == 0
    recorded = result.requests + result.warmup_requests
    assert recorded <= sum(entry["num_requests"] for entry in entries) <= recorded + scenario.users
    assert (tmp_path / "smoke.html").is_file()
    # The ids came from the served index artifact.
    ids = read_ids(tmp_path / "ids.json")
    assert ids == ids_from_artifacts(artifacts.root, session_items=settings.session_items)
    assert len(ids.items) == TEST_DATA.n_items


def _payload(records: list[list[Any]], wall_s: float, rpcs: list[str]) -> dict[str, Any]:
    return {"scenario": "x", "rpcs": rpcs, "records": records, "wall_s": wall_s, "client_cpu_s": wall_s / 4}


def test_summaries_and_markdown_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # Steady, two RPCs: 1 s warm-up with slow calls (left out), then 9 s of known latencies.
    steady = Scenario(
        name="mixed", rpcs=RpcMix(recommend=0.5, similar_items=0.5), users=2, rate=20, duration_s=10, warmup_s=1
    )
    warm = [[0.1 * i, 0, 900.0, "OK", 2, 0] for i in range(10)]
    recommend_ms = rng.uniform(5, 50, size=120)
    measured = [[1.0 + 0.05 * i, 0, float(ms), "OK", 2, 0] for i, ms in enumerate(recommend_ms)]
    measured += [[1.0 + 0.05 * i, 1, 3.0, "OK", 2, 0] for i in range(50)]
    measured += [[5.0, 0, 1.0, "RESOURCE_EXHAUSTED", 2, 0], [6.0, 0, 2000.0, "DEADLINE_EXCEEDED", 2, 0]]
    measured += [[7.0, 0, 2000.0, "DEADLINE_EXCEEDED", 2, 0], [8.0, 0, 40.0, "OK", 2, FLAG_DEGRADED]]
    mixed = summarise(steady, _payload(warm + measured, 10.0, ["Recommend", "SimilarItems"]))
    assert mixed.warmup_requests == 10
    assert mixed.requests == 174
    assert mixed.errors == 3
    assert mixed.errors_by_status == {"DEADLINE_EXCEEDED": 2, "RESOURCE_EXHAUSTED": 1}
    assert mixed.throughput_rps == pytest.approx(174 / 9, abs=0.01)
    assert mixed.degraded == 1
    assert mixed.client_cpu_share == 0.25
    recommend = next(rpc for rpc in mixed.per_rpc if rpc.rpc == "Recommend")
    ok_ms = np.r_[recommend_ms, 40.0]  # the failures are not in the percentiles
    assert recommend.latency is not None
    assert recommend.latency.p50 == pytest.approx(np.percentile(ok_ms, 50), abs=1e-3)
    assert recommend.latency.p99 == pytest.approx(np.percentile(ok_ms, 99), abs=1e-3)
    assert recommend.requests == 124
    assert recommend.errors == 3

    # Ramp: 4 stages of 2 s; throughput 10, 20, 20.7, 18.7 req/s after each stage's 0.5 s warm-up.
    ramp = Scenario(name="ramp", kind="ramp", stages=[1, 2, 4, 8], stage_s=2, warmup_s=0.5)
    records = []
    for stage, per_second in enumerate([10, 20, 21, 19]):
        count = int(per_second * 1.5)
        records += [[2.0 * stage + 0.5 + 1.5 * i / count, 0, 10.0 * (stage + 1), "OK", 1, 0] for i in range(count)]
    records += [[0.1, 0, 500.0, "OK", 1, 0]]  # warm-up of stage 1
    ramped = summarise(ramp, _payload(records, 8.0, ["Recommend"]))
    assert [stage.throughput_rps for stage in ramped.stages] == [10.0, 20.0, 20.67, 18.67]
    assert ramped.saturation is not None
    assert ramped.saturation.users == 2  # 20 >= 0.9 x the peak 20.67
    assert ramped.saturation.peak_users == 4
    assert ramped.saturation.peak_p95_ms == 30.0
    assert ramped.warmup_requests == 1
    growing = [StageResult(users=u, requests=1, errors=0, throughput_rps=r, latency=None) for u, r in [(1, 9), (2, 30)]]
    unsaturated = find_saturation(growing)
    assert unsaturated is not None
    assert unsaturated.users is None
    assert "still growing" in saturation_sentence(unsaturated)

    machine = describe_machine()
    assert machine.cores >= 1
    assert machine.python.count(".") == 2
    report = LoadTestReport(
        command="make loadtest",
        machine=Machine(cores=2, cpu_model="Test CPU", memory_gib=24, python="3.11.2", system="Linux", date="today"),
        setup="setup text",
        targets={"ranking": "127.0.0.1:1", "retrieval": None},
        scenarios=[mixed, ramped],
    )
    write_report(report, tmp_path / "results" / "loadtest.json")
    assert read_report(tmp_path / "results" / "loadtest.json") == report
    assert json.loads((tmp_path / "results" / "loadtest.json").read_text())["scenarios"][1]["saturation"]["users"] == 2

    section = markdown_section(report)
    assert section.startswith(BEGIN_MARKER)
    assert section.endswith(END_MARKER)
    assert "Machine: 2 cores (Test CPU), 24 GiB, Python 3.11.2" in section
    assert "Command: `make loadtest`." in section
    assert "| mixed | Recommend 50% + SimilarItems 50% | 2 | 20 | 19.3 | 174 | 3 |" in section
    assert "DEADLINE_EXCEEDED 2, RESOURCE_EXHAUSTED 1" in section
    assert "| 4 | 20.7 | 31 | 0 | 30.0 | 30.0 | 30.0 |" in section
    assert "Saturated from 2 users (90% of the peak throughput); peak 21 req/s at 4 users (p95 30.0 ms)." in section

    # Missing file: title, machine line, the section.
    docs = tmp_path / "docs" / "benchmarks.md"
    update_docs(docs, section, report.machine)
    created = docs.read_text()
    assert created.startswith("# Benchmarks\n\nMachine: 2 cores (Test CPU)")
    assert created.count(BEGIN_MARKER) == 1
    # Another section owned by someone else survives a rewrite of ours.
    docs.write_text(created.replace(BEGIN_MARKER, "## Retrieval\n\nkeep me\n\n" + BEGIN_MARKER) + "\n## After\n")
    update_docs(docs, section.replace("setup text", "new setup"), report.machine)
    rewritten = docs.read_text()
    assert "keep me" in rewritten
    assert rewritten.endswith("## After\n")
    assert "new setup" in rewritten
    assert "setup text" not in rewritten
    assert rewritten.count(BEGIN_MARKER) == 1
    assert rewritten.count(END_MARKER) == 1
    # No markers yet: appended. Unbalanced markers: refused, the file untouched.
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\n## Index\n")
    update_docs(other, section, report.machine)
    assert other.read_text().startswith("# Benchmarks\n\n## Index\n\n" + BEGIN_MARKER)
    other.write_text(f"# Benchmarks\n{BEGIN_MARKER}\n")
    with pytest.raises(ValueError, match="unbalanced"):
        update_docs(other, section, report.machine)
    assert other.read_text() == f"# Benchmarks\n{BEGIN_MARKER}\n"


def test_ids_file_round_trip(artifacts: BuiltArtifacts, tmp_path: Path) -> None:
    ids = ids_from_artifacts(artifacts.root)
    write_ids(ids, tmp_path / "ids.json")
    assert read_ids(tmp_path / "ids.json") == ids
    assert ids.users
    assert all(isinstance(user, str) for user in ids.users)


def test_warm_up_stops_a_run_that_would_only_fail(servers: Servers, tmp_path: Path) -> None:
    # Ids the served index does not know: SimilarItems answers NOT_FOUND, before any locust run.
    write_ids(LoadIds(users=["no-such-user"], items=["no-such-item"]), tmp_path / "ids.json")
    settings = LoadTestSettings(
        target=f"127.0.0.1:{servers.ranking_server.port}",
        retrieval_target=f"127.0.0.1:{servers.retrieval_server.port}",
        ids_file=tmp_path / "ids.json",
        scenarios=[Scenario(name="mixed", rpcs=RpcMix(recommend=1, similar_items=1), duration_s=2)],
        run_dir=tmp_path,
        docs=None,
    )
    with pytest.raises(LoadTestError, match=r"warm-up: 1 calls failed, e.g. 1 x SimilarItems NOT_FOUND"):
        run_scenarios(settings, "pytest", "fixture servers")
    assert not list(tmp_path.glob("*.records.json"))
