"""From raw per-call records to results: percentiles, throughput, errors, reports.

Latency percentiles are of successful calls (an instantly rejected call would otherwise
make an overloaded service look fast); failed calls are counted by gRPC status. Calls
that start in a scenario's warm-up (or in a ramp stage's) are left out of everything.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from deploy.loadtest.settings import Scenario

BEGIN_MARKER = "<!-- loadtest:begin -->"
END_MARKER = "<!-- loadtest:end -->"
DOCS_TITLE = "# Benchmarks"
# Saturation: the first ramp stage reaching this share of the peak throughput ...
SATURATION_SHARE = 0.90
# ... unless that is the last stage and it still grew by this factor (not saturated yet).
STILL_GROWING = 1.10
# Bits of a record's flags (set by the locustfile from the Recommend response).
FLAG_DEGRADED, FLAG_PARTIAL, FLAG_COLD_START = 1, 2, 4


class Latency(BaseModel):
    """Milliseconds, over successful calls."""

    p50: float
    p95: float
    p99: float
    mean: float
    max: float


class RpcResult(BaseModel):
    rpc: str
    requests: int
    errors: int
    errors_by_status: dict[str, int]
    throughput_rps: float
    latency: Latency | None


class StageResult(BaseModel):
    users: int
    requests: int
    errors: int
    throughput_rps: float
    latency: Latency | None


class Saturation(BaseModel):
    # The fewest users reaching 90% of the peak throughput: more users add latency, not
    # throughput (None: the last stage still grew by 10%, so the ramp did not saturate).
    users: int | None
    peak_users: int
    peak_throughput_rps: float
    peak_p95_ms: float | None


class ScenarioResult(BaseModel):
    name: str
    kind: str
    description: str
    rpcs: dict[str, float]
    users: int
    target_rps: float | None
    measured_s: float
    requests: int
    warmup_requests: int
    errors: int
    errors_by_status: dict[str, int]
    throughput_rps: float
    latency: Latency | None
    per_rpc: list[RpcResult]
    degraded: int
    partial: int
    cold_start: int
    # Share of one core the locust process used: near 1.0 the client, not the service, was the limit.
    client_cpu_share: float
    stages: list[StageResult] = Field(default_factory=list)
    saturation: Saturation | None = None


class Machine(BaseModel):
    cores: int
    cpu_model: str
    memory_gib: float
    python: str
    system: str
    date: str
    # 1-minute load average before the first scenario: other work on the machine skews the numbers.
    load_average: float | None = None

    def describe(self) -> str:
        load = ""
        if self.load_average is not None:
            load = f", 1-minute load average {self.load_average:.1f} before the first scenario"
        return (
            f"{self.cores} cores ({self.cpu_model}), {self.memory_gib:.0f} GiB, Python {self.python}, "
            f"{self.system}; {self.date}{load}"
        )


class LoadTestReport(BaseModel):
    command: str
    machine: Machine
    setup: str
    targets: dict[str, str | None]
    scenarios: list[ScenarioResult]


def describe_machine(now: dt.datetime | None = None) -> Machine:
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 0.0
    when = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    try:
        load_average: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load_average = None
    return Machine(
        cores=os.cpu_count() or 1,
        cpu_model=cpu_model,
        memory_gib=round(memory_gib, 1),
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        date=when,
        load_average=load_average,
    )


# --- summaries -----------------------------------------------------------------------


def _latency(values: np.ndarray[Any, np.dtype[np.float64]]) -> Latency | None:
    if values.size == 0:
        return None
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return Latency(
        p50=round(float(p50), 3),
        p95=round(float(p95), 3),
        p99=round(float(p99), 3),
        mean=round(float(values.mean()), 3),
        max=round(float(values.max()), 3),
    )


class _Calls:
    """The records as columns."""

    def __init__(self, payload: dict[str, Any]) -> None:
        records = payload["records"]
        self.rpc_names: list[str] = list(payload["rpcs"])
        self.t = np.array([r[0] for r in records], dtype=np.float64)
        self.rpc = np.array([r[1] for r in records], dtype=np.int64)
        self.ms = np.array([r[2] for r in records], dtype=np.float64)
        self.status = np.array([r[3] for r in records], dtype=object)
        self.flags = np.array([r[5] for r in records], dtype=np.int64)
        self.ok = self.status == "OK"


def _errors(calls: _Calls, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> dict[str, int]:
    counts = Counter(str(status) for status in calls.status[mask & ~calls.ok])
    return dict(sorted(counts.items()))


def summarise(scenario: Scenario, payload: dict[str, Any]) -> ScenarioResult:
    """One scenario's result from the records the locustfile wrote."""
    calls = _Calls(payload)
    wall_s = float(payload["wall_s"])
    if scenario.kind == "ramp":
        windows = [
            (i * scenario.stage_s + scenario.warmup_s, min((i + 1) * scenario.stage_s, wall_s))
            for i in range(len(scenario.stages))
        ]
    else:
        windows = [(scenario.warmup_s, wall_s)]
    windows = [(start, end) for start, end in windows if end > start]
    masks = [(calls.t >= start) & (calls.t < end) for start, end in windows]
    measured = np.zeros(len(calls.t), dtype=bool)
    for mask in masks:
        measured |= mask
    measured_s = sum(end - start for start, end in windows)
    rate = 1.0 / measured_s if measured_s > 0 else 0.0

    per_rpc = []
    for index, name in enumerate(calls.rpc_names):
        mine = measured & (calls.rpc == index)
        per_rpc.append(
            RpcResult(
                rpc=name,
                requests=int(mine.sum()),
                errors=int((mine & ~calls.ok).sum()),
                errors_by_status=_errors(calls, mine),
                throughput_rps=round(float(mine.sum()) * rate, 2),
                latency=_latency(calls.ms[mine & calls.ok]),
            )
        )
    stages: list[StageResult] = []
    saturation = None
    if scenario.kind == "ramp":
        for users, mask, (start, end) in zip(scenario.stages, masks, windows, strict=False):
            stages.append(
                StageResult(
                    users=users,
                    requests=int(mask.sum()),
                    errors=int((mask & ~calls.ok).sum()),
                    throughput_rps=round(float(mask.sum()) / (end - start), 2),
                    latency=_latency(calls.ms[mask & calls.ok]),
                )
            )
        saturation = find_saturation(stages)
    flags = calls.flags[measured]
    return ScenarioResult(
        name=scenario.name,
        kind=scenario.kind,
        description=scenario.description,
        rpcs=scenario.rpcs.weights(),
        users=scenario.max_users,
        target_rps=scenario.rate if scenario.kind == "steady" else None,
        measured_s=round(measured_s, 3),
        requests=int(measured.sum()),
        warmup_requests=int((~measured).sum()),
        errors=int((measured & ~calls.ok).sum()),
        errors_by_status=_errors(calls, measured),
        throughput_rps=round(float(measured.sum()) * rate, 2),
        latency=_latency(calls.ms[measured & calls.ok]),
        per_rpc=per_rpc,
        degraded=int(((flags & FLAG_DEGRADED) > 0).sum()),
        partial=int(((flags & FLAG_PARTIAL) > 0).sum()),
        cold_start=int(((flags & FLAG_COLD_START) > 0).sum()),
        client_cpu_share=round(float(payload["client_cpu_s"]) / wall_s, 3) if wall_s > 0 else 0.0,
        stages=stages,
        saturation=saturation,
    )


def find_saturation(stages: list[StageResult]) -> Saturation | None:
    """Where a ramp stops gaining throughput; robust to one noisy stage (no first-dip rule)."""
    if not stages:
        return None
    peak = max(stages, key=lambda stage: stage.throughput_rps)
    knee: StageResult | None = next(
        stage for stage in stages if stage.throughput_rps >= SATURATION_SHARE * peak.throughput_rps
    )
    if (
        knee is stages[-1]
        and len(stages) > 1
        and stages[-1].throughput_rps >= STILL_GROWING * stages[-2].throughput_rps
    ):
        knee = None
    return Saturation(
        users=knee.users if knee is not None else None,
        peak_users=peak.users,
        peak_throughput_rps=peak.throughput_rps,
        peak_p95_ms=peak.latency.p95 if peak.latency else None,
    )


# --- output --------------------------------------------------------------------------


def _ms(latency: Latency | None, field: str) -> str:
    return f"{getattr(latency, field):.1f}" if latency is not None else "–"


def _statuses(errors: dict[str, int]) -> str:
    return ", ".join(f"{status} {count}" for status, count in errors.items()) or "none"


def _mix(rpcs: dict[str, float]) -> str:
    total = sum(rpcs.values())
    if len(rpcs) == 1:
        return next(iter(rpcs))
    return " + ".join(f"{name} {weight / total:.0%}" for name, weight in rpcs.items())


def console_table(report: LoadTestReport) -> str:
    """What ``make loadtest`` prints."""
    header = (
        f"{'scenario':<14} {'users':>5} {'target':>7} {'req/s':>8} {'requests':>8} {'errors':>6} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}  errors by status"
    )
    lines = [header, "-" * len(header)]
    for result in report.scenarios:
        rows = [
            (
                result.name,
                result.latency,
                result.requests,
                result.errors,
                result.throughput_rps,
                result.errors_by_status,
            )
        ]
        if len(result.per_rpc) > 1:
            rows += [
                (f"  {rpc.rpc}", rpc.latency, rpc.requests, rpc.errors, rpc.throughput_rps, rpc.errors_by_status)
                for rpc in result.per_rpc
            ]
        for index, (name, latency, requests, errors, rps, by_status) in enumerate(rows):
            users = str(result.users) if index == 0 else ""
            target = f"{result.target_rps:g}" if index == 0 and result.target_rps else ""
            lines.append(
                f"{name:<14} {users:>5} {target:>7} {rps:>8.1f} {requests:>8} {errors:>6} "
                f"{_ms(latency, 'p50'):>7} {_ms(latency, 'p95'):>7} {_ms(latency, 'p99'):>7}  {_statuses(by_status)}"
            )
        for stage in result.stages:
            lines.append(
                f"  {stage.users:>3} users {'':>12} {stage.throughput_rps:>8.1f} {stage.requests:>8} {stage.errors:>6} "
                f"{_ms(stage.latency, 'p50'):>7} {_ms(stage.latency, 'p95'):>7} {_ms(stage.latency, 'p99'):>7}"
            )
        if result.saturation is not None:
            lines.append(f"  {saturation_sentence(result.saturation)}")
        if result.degraded or result.partial:
            lines.append(f"  degraded answers {result.degraded}, partial answers {result.partial}")
    return "\n".join(lines)


def saturation_sentence(saturation: Saturation) -> str:
    peak = f"peak {saturation.peak_throughput_rps:.0f} req/s at {saturation.peak_users} users"
    if saturation.peak_p95_ms is not None:
        peak += f" (p95 {saturation.peak_p95_ms:.1f} ms)"
    if saturation.users is None:
        return f"throughput still growing at the last stage; {peak}"
    return f"saturated from {saturation.users} users (90% of the peak throughput); {peak}"


def markdown_section(report: LoadTestReport) -> str:
    """The docs section between the loadtest markers (markers included)."""
    lines = [
        BEGIN_MARKER,
        "## Load test",
        "",
        f"Machine: {report.machine.describe()}.",
        f"Command: `{report.command}`.",
        "",
        report.setup,
        "",
        "| scenario | RPCs | users | target req/s | req/s | requests | errors | p50 ms | p95 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report.scenarios:
        target = f"{result.target_rps:g}" if result.target_rps else "closed loop"
        users = f"{result.stages[0].users}→{result.stages[-1].users}" if result.stages else str(result.users)
        lines.append(
            f"| {result.name} | {_mix(result.rpcs)} | {users} | {target} | {result.throughput_rps:.1f} | "
            f"{result.requests} | {result.errors} | {_ms(result.latency, 'p50')} | {_ms(result.latency, 'p95')} | "
            f"{_ms(result.latency, 'p99')} |"
        )
        if len(result.per_rpc) > 1:
            for rpc in result.per_rpc:
                lines.append(
                    f"| ↳ {result.name} | {rpc.rpc} | | | {rpc.throughput_rps:.1f} | {rpc.requests} | {rpc.errors} | "
                    f"{_ms(rpc.latency, 'p50')} | {_ms(rpc.latency, 'p95')} | {_ms(rpc.latency, 'p99')} |"
                )
    lines.append("")
    errors = [f"{r.name}: {_statuses(r.errors_by_status)}" for r in report.scenarios]
    lines.append(f"Errors by gRPC status: {'; '.join(errors)}.")
    notes = [
        f"{r.name} {r.degraded} degraded / {r.partial} partial" for r in report.scenarios if r.degraded or r.partial
    ]
    if notes:
        lines.append(f"Recommend answers from the fallback: {'; '.join(notes)}.")
    cpu = ", ".join(f"{r.name} {r.client_cpu_share:.0%}" for r in report.scenarios)
    lines.append(f"Load generator CPU (share of one core): {cpu}.")
    for result in report.scenarios:
        if not result.stages:
            continue
        lines += [
            "",
            f"Ramp `{result.name}` by stage:",
            "",
            "| users | req/s | requests | errors | p50 ms | p95 ms | p99 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for stage in result.stages:
            lines.append(
                f"| {stage.users} | {stage.throughput_rps:.1f} | {stage.requests} | {stage.errors} | "
                f"{_ms(stage.latency, 'p50')} | {_ms(stage.latency, 'p95')} | {_ms(stage.latency, 'p99')} |"
            )
        if result.saturation is not None:
            lines += [
                "",
                saturation_sentence(result.saturation)[0].upper() + saturation_sentence(result.saturation)[1:] + ".",
            ]
    lines.append(END_MARKER)
    return "\n".join(lines)


def update_docs(path: Path, section: str, machine: Machine) -> None:
    """Replace the loadtest section of ``path`` (other sections are left as they are).

    A missing file is created with a title, a machine line and this section; a file
    without the markers gets the section appended.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{DOCS_TITLE}\n\nMachine: {machine.describe()}.\n\n{section}\n")
        return
    text = path.read_text()
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if (begin == -1) != (end == -1) or end < begin:
        raise ValueError(f"{path}: unbalanced {BEGIN_MARKER} / {END_MARKER} markers; fix the file by hand")
    if begin == -1:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = text[:begin] + section + text[end + len(END_MARKER) :]
    path.write_text(text)


def write_report(report: LoadTestReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")


def read_report(path: Path) -> LoadTestReport:
    return LoadTestReport.model_validate_json(path.read_text())
