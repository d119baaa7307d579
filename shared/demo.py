"""``vitrine demo``: data -> artifacts -> two gRPC servers -> recommendations a person can judge.

Generates the embedded dataset and builds the artifacts (both skipped when already
present), starts the retrieval and ranking services as separate processes on free
loopback ports, calls Recommend for a few users over gRPC and prints each user's
recent history beside what they are recommended, then stops both services.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np

from shared.commands import run_build, server_process, vitrine_command
from shared.data import EVENT_TYPES, Dataset, load_dataset
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc

SHOWN_HISTORY = 6
K = 8
DEVICE_BY_NAME: dict[str, ranking_pb2.Device.ValueType] = {
    "web": ranking_pb2.DEVICE_WEB,
    "ios": ranking_pb2.DEVICE_IOS,
    "android": ranking_pb2.DEVICE_ANDROID,
}


def _pick_users(dataset: Dataset, count: int) -> list[int]:
    """A heavy, a typical and a light user (by event count), deterministically."""
    counts = np.bincount(dataset.events.user_index, minlength=len(dataset.users))
    active = np.flatnonzero(counts >= 5)
    by_activity = active[np.argsort(-counts[active], kind="stable")]
    positions = np.linspace(0, len(by_activity) - 1, num=min(count, len(by_activity))).astype(int)
    return [int(by_activity[p]) for p in positions]


def _history_lines(dataset: Dataset, user_row: int) -> tuple[list[str], list[str], str]:
    events = dataset.events
    catalog = dataset.catalog
    mine = np.flatnonzero(events.user_index == user_row)[::-1][:SHOWN_HISTORY]
    lines = [
        f"  {EVENT_TYPES[events.event_code[i]]:<8} {catalog.titles[events.item_index[i]]} "
        f"({catalog.brands[events.item_index[i]]}, {catalog.categories[events.item_index[i]]}, "
        f"${catalog.prices[events.item_index[i]]:.2f})"
        for i in mine
    ]
    last_session = events.session_id[mine[0]] if len(mine) else ""
    session_items = [str(catalog.item_ids[events.item_index[i]]) for i in mine if events.session_id[i] == last_session]
    device = str(events.device[mine[0]]) if len(mine) else "web"
    return lines, session_items, device


def _print_response(response: ranking_pb2.RecommendResponse, elapsed_ms: float) -> None:
    print(
        f"  -> {len(response.items)} items in {elapsed_ms:.1f} ms  (request {response.request_id[:8]}, "
        f"model {response.model_version}, index {response.index_version}, cold_start={response.cold_start})"
    )
    for rank, item in enumerate(response.items, start=1):
        print(f"  {rank:>2}. {item.title} ({item.brand}, {item.category}, ${item.price:.2f})  score {item.score:+.3f}")
        print(f"      why: {item.reason}")


def run_demo(workdir: Path, rebuild: bool, user_count: int) -> int:
    started = time.perf_counter()
    data_dir, artifacts = workdir / "data", workdir / "artifacts"
    if rebuild:
        shutil.rmtree(workdir, ignore_errors=True)
    if not (data_dir / "dataset.json").is_file():
        from shared.datagen import GeneratorConfig, write_default_dataset

        print(f"== generating the embedded retail dataset into {data_dir}", flush=True)
        write_default_dataset(data_dir, GeneratorConfig())
    dataset = load_dataset(data_dir)
    print(f"== dataset: {dataset.counts()}", flush=True)
    if not ((artifacts / "index" / "CURRENT").is_file() and (artifacts / "ranker" / "CURRENT").is_file()):
        print(f"== building artifacts into {artifacts}", flush=True)
        run_build(data_dir, artifacts)
    run_dir = workdir / "run"
    # "Now" for the demo is just after the last generated event, as in the artifacts.
    now = int(dataset.events.timestamp.max()) + 60
    with (
        server_process(
            vitrine_command("serve", "retrieval", "--artifacts", str(artifacts)),
            run_dir / "retrieval.port",
            run_dir / "retrieval.log",
        ) as retrieval_port,
        server_process(
            vitrine_command(
                "serve", "ranking", "--artifacts", str(artifacts), "--retrieval", f"127.0.0.1:{retrieval_port}"
            ),
            run_dir / "ranking.port",
            run_dir / "ranking.log",
        ) as ranking_port,
    ):
        print(f"== retrieval on 127.0.0.1:{retrieval_port}, ranking on 127.0.0.1:{ranking_port}", flush=True)
        with grpc.insecure_channel(f"127.0.0.1:{ranking_port}") as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)
            for user_row in _pick_users(dataset, user_count):
                user_id = str(dataset.users.user_ids[user_row])
                history, session_items, device = _history_lines(dataset, user_row)
                print(
                    f"\n== user {user_id}: most recent of {int((dataset.events.user_index == user_row).sum())} events"
                )
                print("\n".join(history))
                request = ranking_pb2.RecommendRequest(
                    user_id=user_id,
                    k=K,
                    context=ranking_pb2.RequestContext(
                        timestamp=now,
                        device=DEVICE_BY_NAME.get(device, ranking_pb2.DEVICE_UNSPECIFIED),
                        session_item_ids=session_items,
                    ),
                )
                call_started = time.perf_counter()
                response = stub.Recommend(request, timeout=10.0)
                _print_response(response, (time.perf_counter() - call_started) * 1000.0)
            print("\n== new visitor (no history): cold start")
            call_started = time.perf_counter()
            response = stub.Recommend(
                ranking_pb2.RecommendRequest(
                    user_id="new-visitor",
                    k=K,
                    context=ranking_pb2.RequestContext(timestamp=now, device=ranking_pb2.DEVICE_IOS),
                ),
                timeout=10.0,
            )
            _print_response(response, (time.perf_counter() - call_started) * 1000.0)
    print(f"\n== services stopped; demo took {time.perf_counter() - started:.0f}s (logs in {run_dir})")
    return 0
