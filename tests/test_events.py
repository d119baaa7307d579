"""LogEvents, online user state (in process and in a real redis-server), training capture.

Real servers on loopback: a ranking server of this module's own (so its events never
reach the session's shared ranking server) in front of the session's retrieval server.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ranking_service.artifact import KIND as RANKER_KIND
from ranking_service.artifact import load_ranker_artifact, load_ranker_snapshot
from ranking_service.capture import header
from ranking_service.features import FEATURE_NAMES
from ranking_service.online import InMemoryUserState, OnlineEvent, merged_history
from ranking_service.server import start_ranking_server
from ranking_service.store import UserHistory
from ranking_service.training import CaptureError, logged_requests, train_ranker_from_logs
from shared.artifacts import current_version, open_artifact
from shared.cli import main
from shared.config import CaptureSettings, OnlineStateSettings, RankerBuildSettings, RankingSettings
from shared.data import CART, EVENT_CODE, EVENT_TYPES, PURCHASE, VIEW, WISHLIST, Dataset
from shared.grpc_server import RunningServer
from shared.interactions import event_intent, event_labels, event_weights
from shared.proto.vitrine.v1 import ranking_pb2, ranking_pb2_grpc
from shared.redis_client import redacted_url
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.redis_helpers import RedisServer, free_port, start_redis, stop_redis

MAX_BATCH = 20


def _now(dataset: Dataset) -> int:
    return int(dataset.events.timestamp.max()) + 60


@dataclass
class Ranking:
    server: RunningServer
    stub: ranking_pb2_grpc.RankingStub
    channel: grpc.Channel

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


def start_ranking(
    artifacts: BuiltArtifacts,
    servers: Servers,
    online: OnlineStateSettings | None = None,
    capture: CaptureSettings | None = None,
) -> Ranking:
    server = start_ranking_server(
        RankingSettings(
            artifacts=artifacts.root,
            port=0,
            metrics_port=None,
            reload_poll_s=0,
            compiled_trees=False,
            retrieval_target=f"127.0.0.1:{servers.retrieval_server.port}",
            max_k=50,
            max_events_per_batch=MAX_BATCH,
            online_state=online or OnlineStateSettings(),
            capture=capture or CaptureSettings(),
        )
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return Ranking(server, ranking_pb2_grpc.RankingStub(channel), channel)


@pytest.fixture(scope="module")
def ranking(artifacts: BuiltArtifacts, servers: Servers) -> Iterator[Ranking]:
    running = start_ranking(artifacts, servers)
    yield running
    running.close()


def recommend(
    stub: ranking_pb2_grpc.RankingStub, user_id: str, k: int, timestamp: int
) -> ranking_pb2.RecommendResponse:
    context = ranking_pb2.RequestContext(timestamp=timestamp, device=ranking_pb2.DEVICE_WEB)
    return stub.Recommend(ranking_pb2.RecommendRequest(user_id=user_id, k=k, context=context), timeout=10)


def user_event(user_id: str, item_id: str, kind: int, timestamp: int, request_id: str = "") -> ranking_pb2.UserEvent:
    return ranking_pb2.UserEvent(
        user_id=user_id,
        item_id=item_id,
        type=kind,  # type: ignore[arg-type]
        timestamp=timestamp,
        device=ranking_pb2.DEVICE_WEB,
        request_id=request_id,
    )


def log_events(stub: ranking_pb2_grpc.RankingStub, *events: ranking_pb2.UserEvent) -> ranking_pb2.LogEventsResponse:
    return stub.LogEvents(ranking_pb2.LogEventsRequest(events=list(events)), timeout=10)


def ids(response: ranking_pb2.RecommendResponse) -> list[str]:
    return [item.item_id for item in response.items]


# -- wishlist: the event code mapping -------------------------------------------------------


def test_wishlist_is_appended_and_ranked_between_view_and_cart() -> None:
    # Codes are stored in artifacts (ranker event snapshots): the old ones must not move.
    assert EVENT_TYPES[:3] == ("view", "cart", "purchase")
    assert (VIEW, CART, PURCHASE, WISHLIST) == (0, 1, 2, 3)
    assert EVENT_CODE["wishlist"] == WISHLIST
    codes = np.asarray([VIEW, WISHLIST, CART, PURCHASE], dtype=np.int8)
    for ordered in (event_weights(codes), event_intent(codes)):
        assert np.all(np.diff(ordered) > 0), ordered
    # Max-intent values of the three old types are what rankers trained before wishlist saw.
    assert event_intent(np.asarray([VIEW, CART, PURCHASE], np.int8)).tolist() == [1.0, 2.0, 3.0]
    assert event_labels(codes).tolist() == [1, 1, 2, 3]


# -- online state units -----------------------------------------------------------------------


def test_in_memory_state_is_bounded_thread_safe_and_newest_first() -> None:
    state = InMemoryUserState(max_events_per_user=50)

    def writer(offset: int) -> None:
        for i in range(100):
            state.append([OnlineEvent("u", f"i{i}", VIEW, 1000 + offset * 1000 + i)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recent = state.recent("u", since=0)
    assert len(recent) == 50
    assert [e.timestamp for e in recent] == sorted((e.timestamp for e in recent), reverse=True)
    assert state.recent("u", since=10_000) == []
    assert state.recent("nobody", since=0) == []
    few_users = InMemoryUserState(max_events_per_user=5, max_users=2)
    for user in ("a", "b", "a", "c"):  # "b" is the least recently active when "c" arrives
        few_users.append([OnlineEvent(user, "i", VIEW, 1)])
    assert [len(few_users.recent(user, since=0)) for user in ("a", "b", "c")] == [2, 0, 1]


def test_merged_history_puts_known_online_events_first() -> None:
    snapshot = UserHistory(
        np.asarray([5, 6], np.int32), np.asarray([VIEW, PURCHASE], np.int8), np.asarray([90, 80], np.int64)
    )
    online = [
        OnlineEvent("u", "b", CART, 120),
        OnlineEvent("u", "a", VIEW, 110),
        OnlineEvent("u", "unknown", PURCHASE, 130),  # not in the snapshot's catalogue
        OnlineEvent("u", "a", PURCHASE, 500),  # after the request time
    ]
    merged = merged_history(snapshot, online, {"a": 1, "b": 2}, before=200)
    assert merged.item_rows.tolist() == [2, 1, 5, 6]
    assert merged.event_codes.tolist() == [CART, VIEW, VIEW, PURCHASE]
    assert merged.timestamps.tolist() == [120, 110, 90, 80]


def test_redis_url_password_is_redacted() -> None:
    assert redacted_url("redis://:secret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted_url("redis://app:secret@cache/1") == "redis://app:***@cache/1"
    assert redacted_url("redis://cache:6379/0") == "redis://cache:6379/0"


# -- LogEvents through a real server ------------------------------------------------------------


def test_logged_purchase_removes_the_item_and_shifts_the_next_answer(ranking: Ranking, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[11]
    now = _now(dataset)
    before = recommend(ranking.stub, user, 10, now)
    assert not before.cold_start
    bought = before.items[0].item_id
    response = log_events(ranking.stub, user_event(user, bought, ranking_pb2.EVENT_TYPE_PURCHASE, now))
    assert (response.accepted, response.unknown_items) == (1, 0)
    after = recommend(ranking.stub, user, 10, now + 1)
    assert bought not in ids(after)
    # Not just the old list minus the item: the purchase moved the query and the user's
    # features, so the items both answers hold are scored afresh (whether that reorders
    # them depends on the model).
    scored_before = {item.item_id: item.score for item in before.items}
    kept = [(scored_before[item.item_id], item.score) for item in after.items if item.item_id in scored_before]
    assert kept
    assert any(old != new for old, new in kept), kept
    # The same request time as the purchase sees it too ("within the same second").
    assert bought not in ids(recommend(ranking.stub, user, 10, now))


def test_views_make_a_cold_start_user_warm_and_change_the_answer(ranking: Ranking, dataset: Dataset) -> None:
    user = "events-new-user-views"
    now = _now(dataset)
    cold = recommend(ranking.stub, user, 10, now)
    assert cold.cold_start
    catalog = dataset.catalog
    in_stock = catalog.stock > 0
    # The category least represented in the cold answer: views of it must show.
    cold_categories = [item.category for item in cold.items]
    category = min(np.unique(catalog.categories).tolist(), key=cold_categories.count)
    viewed = catalog.item_ids[(catalog.categories == category) & in_stock][:4].tolist()
    views = [user_event(user, item, ranking_pb2.EVENT_TYPE_VIEW, now - 10 + i) for i, item in enumerate(viewed)]
    response = log_events(ranking.stub, *views)
    assert response.accepted == len(viewed)
    warm = recommend(ranking.stub, user, 10, now)
    assert not warm.cold_start
    assert ids(warm) != ids(cold)
    share = np.mean([item.category == category for item in warm.items])
    assert share >= 0.5, f"after viewing {category} items, {share:.0%} of the answer is {category}"


def test_unknown_items_and_wishlist_are_accepted_and_counted(ranking: Ranking, dataset: Dataset) -> None:
    item = str(dataset.catalog.item_ids[0])
    response = log_events(
        ranking.stub,
        user_event("events-unknown-items", "upserted-after-the-build", ranking_pb2.EVENT_TYPE_VIEW, 0),
        user_event("events-unknown-items", item, ranking_pb2.EVENT_TYPE_WISHLIST, 0),
    )
    assert (response.accepted, response.unknown_items) == (2, 1)
    # Timestamp 0 is "now" on the server clock: a request at the current time sees the wishlist add.
    assert not recommend(ranking.stub, "events-unknown-items", 5, 0).cold_start


def _violation(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return str(detail.field_violations[0].field)


@pytest.mark.parametrize(
    ("bad", "field", "fragment"),
    [
        (ranking_pb2.UserEvent(item_id="x", type=ranking_pb2.EVENT_TYPE_VIEW), "events[3].user_id", "is empty"),
        (ranking_pb2.UserEvent(user_id="u", type=ranking_pb2.EVENT_TYPE_VIEW), "events[3].item_id", "is empty"),
        (ranking_pb2.UserEvent(user_id="u", item_id="x"), "events[3].type", "VIEW, CART"),
        (
            ranking_pb2.UserEvent(user_id="u", item_id="x", type=ranking_pb2.EVENT_TYPE_VIEW, timestamp=-5),
            "events[3].timestamp",
            "unix seconds",
        ),
        (
            ranking_pb2.UserEvent(user_id="u", item_id="x", type=ranking_pb2.EVENT_TYPE_VIEW, timestamp=10**13),
            "events[3].timestamp",
            "unix seconds",
        ),
        (
            ranking_pb2.UserEvent(user_id="u" * 300, item_id="x", type=ranking_pb2.EVENT_TYPE_VIEW),
            "events[3].user_id",
            "at most 256",
        ),
    ],
)
def test_a_bad_event_rejects_the_whole_batch(
    ranking: Ranking, dataset: Dataset, bad: ranking_pb2.UserEvent, field: str, fragment: str
) -> None:
    user = users_by_activity(dataset)[12]
    now = _now(dataset)
    top = recommend(ranking.stub, user, 5, now).items[0].item_id
    good = [user_event(user, top, ranking_pb2.EVENT_TYPE_PURCHASE, now)] * 3
    with pytest.raises(grpc.RpcError) as caught:
        log_events(ranking.stub, *good, bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(caught.value.details())
    assert fragment in str(caught.value.details())
    assert _violation(caught.value) == field
    # Nothing of the batch was stored: the purchase at index 0 does not exclude the item.
    assert recommend(ranking.stub, user, 5, now).items[0].item_id == top


def test_too_many_events_is_invalid_argument(ranking: Ranking) -> None:
    batch = [user_event("u", "x", ranking_pb2.EVENT_TYPE_VIEW, 0)] * (MAX_BATCH + 1)
    with pytest.raises(grpc.RpcError) as caught:
        log_events(ranking.stub, *batch)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_BATCH}" in str(caught.value.details())
    assert _violation(caught.value) == "events"


# -- Redis ------------------------------------------------------------------------------------------


def test_redis_keeps_acknowledged_events_across_a_ranking_restart(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, redis_server: RedisServer
) -> None:
    online = OnlineStateSettings(backend="redis", redis_url=redis_server.url, max_events_per_user=10)
    user = users_by_activity(dataset)[13]
    now = _now(dataset)
    first = start_ranking(artifacts, servers, online)
    try:
        before = recommend(first.stub, user, 10, now)
        bought = before.items[0].item_id
        extra = [user_event(user, f"unknown-{i}", ranking_pb2.EVENT_TYPE_VIEW, now - 100 + i) for i in range(12)]
        assert log_events(first.stub, *extra).unknown_items == 12
        assert log_events(first.stub, user_event(user, bought, ranking_pb2.EVENT_TYPE_PURCHASE, now)).accepted == 1
        assert bought not in ids(recommend(first.stub, user, 10, now))
    finally:
        first.close()
    key = f"{online.key_prefix}{user}"
    check = redis.Redis.from_url(redis_server.url)
    try:
        assert check.llen(key) == 10, "the per-user list is capped"
        assert 0 < check.ttl(key) <= online.ttl_s
    finally:
        check.close()
    second = start_ranking(artifacts, servers, online)
    try:
        assert bought not in ids(recommend(second.stub, user, 10, now))
    finally:
        second.close()


def test_redis_unreachable_fails_log_events_but_not_recommend(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    online = OnlineStateSettings(backend="redis", redis_url=url, connect_timeout_s=0.2, socket_timeout_s=0.2)
    running = start_ranking(artifacts, servers, online)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            log_events(running.stub, user_event("u", "x", ranking_pb2.EVENT_TYPE_VIEW, 0))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        details = str(caught.value.details())
        assert redacted_url(url) in details
        assert "hunter2" not in details
        user = users_by_activity(dataset)[14]
        response = recommend(running.stub, user, 10, _now(dataset))
        assert len(response.items) == 10
        assert not response.cold_start
    finally:
        running.close()


# -- capture and train-ranker --from-logs ------------------------------------------------------------


def test_an_event_before_the_impression_never_labels_it() -> None:
    features = [[0.0] * len(FEATURE_NAMES)] * 3
    impression = {
        "request_id": "r1",
        "user_id": "u",
        "timestamp": 1000,
        "items": [{"item_id": item, "position": p, "features": features[p]} for p, item in enumerate("abc")],
    }
    events = [
        {"user_id": "u", "item_id": "a", "event_code": PURCHASE, "timestamp": 999},  # before: no label
        {"user_id": "u", "item_id": "a", "event_code": VIEW, "timestamp": 1000},  # same second: no label
        {"user_id": "u", "item_id": "b", "event_code": VIEW, "timestamp": 1001},
        {"user_id": "u", "item_id": "b", "event_code": CART, "timestamp": 1500},
        {"user_id": "u", "item_id": "c", "event_code": PURCHASE, "timestamp": 1000 + 7200},  # after the window
        {"user_id": "other", "item_id": "c", "event_code": PURCHASE, "timestamp": 1001},  # another user
    ]
    (request,) = logged_requests([impression], events, window_s=3600)
    assert request.labels.tolist() == [0, 2, 0]
    # An event naming the impression follows it, whatever the clocks say.
    events.append({"user_id": "u", "item_id": "c", "event_code": WISHLIST, "timestamp": 900, "request_id": "r1"})
    (request,) = logged_requests([impression], events, window_s=3600)
    assert request.labels.tolist() == [0, 2, 1]


def test_logs_with_other_features_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "impressions"
    folder.mkdir()
    head = {**header("impressions"), "feature_names": [*FEATURE_NAMES[:-1], "renamed"]}
    (folder / "impressions-1-1-000001.jsonl").write_text(json.dumps(head) + "\n")
    with pytest.raises(CaptureError, match="this build computes"):
        train_ranker_from_logs(tmp_path, tmp_path / "artifacts", RankerBuildSettings())
    # The command says what is wrong, without a traceback.
    assert main(["train-ranker", "--from-logs", str(tmp_path), "--out", str(tmp_path / "artifacts")]) == 2
    assert "this build computes" in capsys.readouterr().err


def test_train_ranker_from_captured_logs_serves(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture_dir = tmp_path / "capture"
    capture = CaptureSettings(enabled=True, directory=capture_dir, flush_interval_s=0.05, rotate_bytes=200_000)
    running = start_ranking(artifacts, servers, capture=capture)
    rng = np.random.default_rng(3)
    now = _now(dataset)
    outcome_types = [ranking_pb2.EVENT_TYPE_PURCHASE, ranking_pb2.EVENT_TYPE_CART, ranking_pb2.EVENT_TYPE_VIEW]
    try:
        for user in users_by_activity(dataset)[100:190]:
            response = recommend(running.stub, user, 20, now)
            positions = rng.choice(20, size=3, replace=False)
            log_events(
                running.stub,
                *(
                    user_event(user, response.items[int(p)].item_id, kind, now + 30 + i, response.request_id)
                    for i, (p, kind) in enumerate(zip(positions, outcome_types, strict=True))
                ),
            )
    finally:
        running.close()  # flushes the capture files
    impression_files = sorted((capture_dir / "impressions").glob("*.jsonl"))
    assert len(impression_files) >= 2, "rotation starts new files"
    lines = [json.loads(line) for line in impression_files[0].read_text().splitlines()]
    assert lines[0]["feature_names"] == list(FEATURE_NAMES)
    first = lines[1]
    assert first["variant"] == ""
    assert first["model_version"] == artifacts.ranker.version
    assert [item["position"] for item in first["items"]] == list(range(20))
    assert all(len(item["features"]) == len(FEATURE_NAMES) for item in first["items"])

    # Train next to a copy of the served ranker, so the session's servers never see the new version.
    root = tmp_path / "artifacts"
    shutil.copytree(artifacts.root / "ranker", root / "ranker")
    monkeypatch.setenv("VITRINE_RANKER_BUILD__MIN_DATA_IN_LEAF", "10")
    monkeypatch.setenv("VITRINE_RANKER_BUILD__NUM_TREES", "50")
    assert main(["train-ranker", "--from-logs", str(capture_dir), "--out", str(root)]) == 0
    trained = open_artifact(root, "ranker", RANKER_KIND)
    assert trained.version != artifacts.ranker.version
    assert trained.params["base_version"] == artifacts.ranker.version
    # The logged features came from the base's item model: refitted with its settings, not tuned again.
    assert trained.params["item_model"] == artifacts.ranker.params["item_model"]
    assert trained.metrics["train_requests_with_relevant_candidate"] >= 20
    loaded = load_ranker_artifact(root, version=trained.version)
    assert loaded.snapshot_at > now  # the logged events are in the new snapshot
    # Logged events keep sessions of their own, apart from the base snapshot's.
    grown = load_ranker_snapshot(root, version=trained.version).events
    logged = grown.timestamp >= load_ranker_snapshot(artifacts.root, version=artifacts.ranker.version).snapshot_at
    assert logged.any()
    assert not set(grown.session_id[logged]) & set(grown.session_id[~logged])
    assert current_version(root, "ranker") == trained.version
    served = start_ranking_server(
        RankingSettings(
            artifacts=root,
            port=0,
            metrics_port=None,
            reload_poll_s=0,
            compiled_trees=False,
            retrieval_target=f"127.0.0.1:{servers.retrieval_server.port}",
        )
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            response = recommend(ranking_pb2_grpc.RankingStub(channel), users_by_activity(dataset)[100], 10, now + 60)
        assert response.model_version == trained.version
        assert len(response.items) == 10
    finally:
        served.stop()


def test_a_hung_redis_costs_one_recommend_a_timeout_not_every_one(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    """A Redis that accepts connections and never answers: the first Recommend waits for the
    socket timeout and answers from the snapshot; the next ones skip Redis (read backoff)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        online = OnlineStateSettings(
            backend="redis", redis_url=url, socket_timeout_s=0.3, retries=0, read_backoff_s=30.0
        )
        running = start_ranking(artifacts, servers, online)
        try:
            user, now = users_by_activity(dataset)[15], _now(dataset)
            timings = []
            for _ in range(4):
                started = time.perf_counter()
                assert len(recommend(running.stub, user, 10, now).items) == 10
                timings.append(time.perf_counter() - started)
            assert timings[0] >= 0.3
            assert max(timings[1:]) < 0.3, timings
            with pytest.raises(grpc.RpcError) as caught:
                log_events(running.stub, user_event(user, "x", ranking_pb2.EVENT_TYPE_VIEW, 0))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            running.close()


def test_acknowledged_events_survive_a_redis_restart(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset, tmp_path: Path
) -> None:
    """With Redis' append-only file on, a restart of Redis itself loses nothing acknowledged."""
    port = free_port()
    server = start_redis(tmp_path, port)
    online = OnlineStateSettings(backend="redis", redis_url=server.url, read_backoff_s=0)
    user, now = users_by_activity(dataset)[16], _now(dataset)
    running = start_ranking(artifacts, servers, online)
    try:
        bought = recommend(running.stub, user, 10, now).items[0].item_id
        assert log_events(running.stub, user_event(user, bought, ranking_pb2.EVENT_TYPE_PURCHASE, now)).accepted == 1
        stop_redis(server)
        # Redis down: the answer comes from the snapshot history, the purchase is not seen.
        assert bought in ids(recommend(running.stub, user, 10, now))
        server = start_redis(tmp_path, port)
        assert bought not in ids(recommend(running.stub, user, 10, now))
    finally:
        running.close()
        stop_redis(server)
