"""An asyncio (grpc.aio) load generator for ``Ranking.Recommend``, bounded in time and count.

* Open loop at a fixed rate: request i is sent at ``t0 + i / rate`` whether or not earlier
  ones have answered (a slow server is not allowed to slow the client down, so queueing
  shows in the latency), for ``seconds`` or ``max_requests``, whichever comes first.
* Closed loop at saturation: ``concurrency`` callers each send their next request as soon
  as the previous one answers, for ``seconds``; throughput is answers per second.

Latency is measured from the moment a request is sent to its answer; errors are counted
by status code (a deadline exceeded is an error, not a slow success).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from ranking_service.pipeline import RecommendQuery
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc

DEADLINE_S = 2.0


@dataclass
class PhaseResult:
    phase: str
    target_rps: float | None
    concurrency: int | None
    sent: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    # CPU time of the load generator (this process) per request sent, in ms: what the client
    # takes from the 2 cores it shares with the services.
    client_cpu_ms_per_request: float = 0.0

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def request_of(query: RecommendQuery) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(
        user_id=query.user_id,
        k=query.k,
        context=ranking_pb2.RequestContext(timestamp=query.timestamp, device=ranking_pb2.DEVICE_WEB),
    )


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.cpu_started = time.process_time()

    async def call(self, stub: ranking_pb2_grpc.RankingStub, request: ranking_pb2.RecommendRequest) -> None:
        self.sent += 1
        started = time.perf_counter()
        try:
            await stub.Recommend(request, timeout=DEADLINE_S)  # type: ignore[misc]  # aio stub, sync typing
        except grpc.aio.AioRpcError as error:
            self.errors[error.code().name] += 1
            return
        self.latencies.append(time.perf_counter() - started)

    def result(self, phase: str, seconds: float, rate: float | None, concurrency: int | None) -> PhaseResult:
        millis = np.asarray(self.latencies, dtype=np.float64) * 1000.0

        def percentile(q: float) -> float:
            return round(float(np.percentile(millis, q)), 3) if len(millis) else 0.0

        return PhaseResult(
            phase=phase,
            target_rps=rate,
            concurrency=concurrency,
            sent=self.sent,
            ok=len(self.latencies),
            errors=dict(self.errors),
            seconds=round(seconds, 2),
            throughput_rps=round(len(self.latencies) / seconds, 1) if seconds > 0 else 0.0,
            p50_ms=percentile(50),
            p95_ms=percentile(95),
            p99_ms=percentile(99),
            max_ms=round(float(millis.max()), 3) if len(millis) else 0.0,
            client_cpu_ms_per_request=(
                round((time.process_time() - self.cpu_started) * 1000.0 / self.sent, 3) if self.sent else 0.0
            ),
        )


async def _open_loop(
    target: str, requests: list[ranking_pb2.RecommendRequest], rate: float, seconds: float, max_requests: int
) -> PhaseResult:
    recorder = _Recorder()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        await channel.channel_ready()
        tasks: list[asyncio.Task[None]] = []
        count = min(max_requests, int(rate * seconds))
        started = time.perf_counter()
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(recorder.call(stub, requests[i % len(requests)])))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return recorder.result(f"{rate:g} rps", elapsed, rate, None)


async def _closed_loop(
    target: str, requests: list[ranking_pb2.RecommendRequest], concurrency: int, seconds: float, max_requests: int
) -> PhaseResult:
    recorder = _Recorder()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranking_pb2_grpc.RankingStub(channel)
        await channel.channel_ready()
        started = time.perf_counter()
        stop_at = started + seconds

        async def caller(offset: int) -> None:
            position = offset
            while time.perf_counter() < stop_at and recorder.sent < max_requests:
                await recorder.call(stub, requests[position % len(requests)])
                position += concurrency

        await asyncio.gather(*(caller(offset) for offset in range(concurrency)))
        elapsed = time.perf_counter() - started
    return recorder.result(f"saturation x{concurrency}", elapsed, None, concurrency)


def open_loop(
    target: str, queries: list[RecommendQuery], rate: float, seconds: float, max_requests: int
) -> PhaseResult:
    return asyncio.run(_open_loop(target, [request_of(q) for q in queries], rate, seconds, max_requests))


def closed_loop(
    target: str, queries: list[RecommendQuery], concurrency: int, seconds: float, max_requests: int
) -> PhaseResult:
    return asyncio.run(_closed_loop(target, [request_of(q) for q in queries], concurrency, seconds, max_requests))
