"""`vitrine evaluate`: splits, baselines and one small run of the whole harness."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from shared.commands import training_index_name
from shared.config import VitrineSettings
from shared.data import VIEW, Dataset, Events
from shared.datagen import GeneratorConfig, generate
from shared.evaluation.baselines import (
    ALS,
    BASELINES,
    EASE,
    ItemKNN,
    MostPopular,
    RecentPopular,
    TrainPart,
    top_k,
    tune,
)
from shared.evaluation.pipeline import RETRIEVAL_VARIANTS
from shared.evaluation.protocols import interaction_matrix, split, validation_split
from shared.evaluation.report import group_table
from shared.evaluation.run import CANDIDATE_SIZES, MethodResult, Results, evaluate, list_metrics, user_groups

SMALL = GeneratorConfig(seed=5, n_items=300, n_users=160, n_events=8_000)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(SMALL)


def _pairs(dataset: Dataset) -> set[tuple[int, int]]:
    events = dataset.events
    return set(zip(events.user_index.tolist(), events.item_index.tolist(), strict=True))


def test_random_split_is_a_stratified_partition_of_each_users_items(small: Dataset) -> None:
    result = split(small, "random", seed=42)
    train_pairs = _pairs(result.train)
    test_pairs = {(user, int(item)) for user, items in enumerate(result.test_items) for item in items}
    assert not train_pairs & test_pairs
    assert train_pairs | test_pairs == _pairs(small)
    for user in range(len(small.users)):
        total = sum(1 for u, _ in _pairs(small) if u == user)
        assert len(result.test_items[user]) == total - round(0.75 * total)
    again = split(small, "random", seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(result.test_items, again.test_items, strict=True))
    other = split(small, "random", seed=43)
    assert not all(np.array_equal(a, b) for a, b in zip(result.test_items, other.test_items, strict=True))
    assert result.request_time > int(result.train.events.timestamp.max())


def test_temporal_split_trains_on_the_past_and_tests_on_new_items_of_the_future(small: Dataset) -> None:
    result = split(small, "temporal", seed=42)
    assert int(result.train.events.timestamp.max()) < result.request_time
    assert 0.7 < len(result.train.events) / len(small.events) < 0.8
    train_pairs = _pairs(result.train)
    future = small.events.timestamp >= result.request_time
    future_pairs = set(
        zip(small.events.user_index[future].tolist(), small.events.item_index[future].tolist(), strict=True)
    )
    test_pairs = {(user, int(item)) for user, items in enumerate(result.test_items) for item in items}
    assert test_pairs == future_pairs - train_pairs
    # Tuning never sees test: the validation split lives inside train.
    validation = validation_split(result.train, "temporal", seed=42)
    assert int(validation.train.events.timestamp.max()) < validation.request_time <= result.request_time


def test_the_pipeline_trains_on_the_catalogue_as_it_stood_at_the_request_time(small: Dataset) -> None:
    """Items created after a temporal cutoff are not there for any method to point at."""
    test = split(small, "temporal", seed=42)
    saved = test.train_at_request()
    created_later = test.train.catalog.created_at > test.request_time
    assert created_later.any()
    assert saved.catalog.item_ids.tolist() == test.train.catalog.item_ids[~created_later].tolist()
    assert len(saved.events) == len(test.train.events)
    assert (
        saved.catalog.item_ids[saved.events.item_index].tolist()
        == test.train.catalog.item_ids[test.train.events.item_index].tolist()
    )
    # Their test interactions stay in the test part, where no method can reach them.
    assert any(created_later[items].any() for items in test.test_items)


def test_users_without_train_events_are_scored_apart(small: Dataset) -> None:
    """A time split's newcomers get a cold-start answer: their metrics are reported apart."""
    test = split(small, "temporal", seed=42)
    evaluated = test.evaluated_users
    groups = user_groups(test)
    assert set(groups) == {"without_history", "with_history"}
    newcomers = groups["without_history"]
    train_users = set(test.train.events.user_index.tolist())
    assert len(newcomers)
    assert not train_users & set(newcomers.tolist())
    assert set(groups["with_history"].tolist()) <= train_users
    assert sorted([*newcomers, *groups["with_history"]]) == sorted(evaluated.tolist())
    # Each newcomer gets their test items on top, everybody else nothing.
    lists = [np.zeros(0, np.int32)] * len(test.test_items)
    for user in newcomers:
        lists[user] = test.test_items[user][:10]
    metrics, by_group = list_metrics(test, groups, lists, k=10)
    assert by_group["without_history"]["hit_rate@10"] == 1.0
    assert by_group["with_history"]["hit_rate@10"] == 0.0
    assert by_group["without_history"]["users"] == len(newcomers)
    assert metrics["hit_rate@10"] == pytest.approx(len(newcomers) / len(evaluated))
    # One group (a random split's users all have train events): no breakdown.
    assert list_metrics(test, {"with_history": evaluated}, lists, k=10)[1] == {}

    results = Results(
        "d", "temporal", 10, 42, [MethodResult("vitrine", "vitrine", metrics, 1.0, {}, by_group)], {}, {}, {}
    )
    table = group_table(results).splitlines()
    assert table[0] == (
        f"| method | without_history ({len(newcomers)} users) ndcg@10 | without_history ({len(newcomers)} users) "
        f"hit_rate@10 | with_history ({len(evaluated) - len(newcomers)} users) ndcg@10 "
        f"| with_history ({len(evaluated) - len(newcomers)} users) hit_rate@10 |"
    )
    assert table[2].startswith("| **vitrine** | 1.0000 | 1.0000 | 0.0000 | 0.0000 |")
    assert group_table(replace(results, methods=[replace(results.methods[0], by_group={})])) == ""


def test_ease_matches_the_closed_form_and_top_k_excludes_seen_items() -> None:
    rng = np.random.default_rng(0)
    dense = (rng.random((30, 12)) < 0.3).astype(np.float32)
    matrix = sp.csr_matrix(dense)
    ease = EASE(l2=5.0)
    ease.fit(TrainPart(matrix))
    gram = dense.T @ dense + 5.0 * np.eye(12)
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    users = np.arange(30)
    assert np.allclose(ease.scores(users), dense @ weights, atol=1e-4)
    for user, ranked in zip(users, top_k(ease, matrix, users, k=3), strict=True):
        assert len(ranked) == 3
        assert not set(ranked.tolist()) & set(np.flatnonzero(dense[user]).tolist())


def test_recent_popular_ranks_by_decayed_counts_and_answers_newcomers_itself() -> None:
    """Item 0: three views 30 days before now; item 1: one view now; item 2: one view 30
    days ago. User 2 has no train item and gets the baseline's own order, not all time's."""
    day = 86_400
    now = 100 * day
    events = Events(
        user_index=np.array([0, 0, 1, 1, 0], np.int32),
        item_index=np.array([0, 0, 0, 1, 2], np.int32),
        event_code=np.full(5, VIEW, np.int8),
        timestamp=np.array([now - 30 * day] * 3 + [now, now - 30 * day], np.int64),
        device=np.full(5, "web"),
        session_id=np.full(5, "s"),
    )
    matrix = sp.csr_matrix(np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0]], np.float32))
    train = TrainPart(matrix, events, now)
    recent = RecentPopular(half_life_days=10.0)
    recent.fit(train)
    # 3 x 0.5^3 = 0.375 for item 0, 1 for item 1, 0.125 for item 2.
    assert np.allclose(recent.scores(np.array([2])), [[0.375, 1.0, 0.125]])
    assert top_k(recent, matrix, np.array([2]), k=2)[0].tolist() == [1, 0]
    # All time counts each event once; a prior of 4 spread by all-time shares (3/5, 1/5, 1/5).
    for half_life, prior, expected in ((None, 0.0, [3.0, 1.0, 1.0]), (10.0, 4.0, [2.775, 1.8, 0.925])):
        model = RecentPopular(half_life_days=half_life, prior_weight=prior)
        model.fit(train)
        assert np.allclose(model.scores(np.array([0, 2])), [expected, expected])
    popular = MostPopular()
    popular.fit(train)
    assert top_k(popular, matrix, np.array([2]), k=2)[0][0] == 0  # items 1 and 2 tie
    with pytest.raises(ValueError, match="needs the train events"):
        RecentPopular(half_life_days=10.0).fit(TrainPart(matrix))


def test_every_baseline_beats_chance_on_structured_data(small: Dataset) -> None:
    """Real fits (implicit's ALS included) on the generator's taste clusters."""
    result = split(small, "random", seed=1)
    matrix = interaction_matrix(result.train)
    users = result.evaluated_users
    from shared.metrics import top_k_metrics

    relevant = [result.test_items[u] for u in users]
    chance = np.mean([len(items) / len(small.catalog) for items in relevant]) * 10
    train = TrainPart(matrix, result.train.events, result.request_time)
    for recommender in (
        MostPopular(),
        RecentPopular(half_life_days=7.0),
        ItemKNN(neighbours=50),
        EASE(l2=100.0),
        ALS(16, 0.1, 5.0, iterations=5),
    ):
        recommender.fit(train)
        precision = top_k_metrics(top_k(recommender, matrix, users, 10), relevant, 10, len(small.catalog))
        assert precision["precision@10"] > 2 * chance / 10, type(recommender).__name__


def test_tuning_picks_the_best_validation_setting(small: Dataset) -> None:
    validation = validation_split(small, "random", seed=3)
    ease = next(b for b in BASELINES if b.name == "ease")
    tuned = tune(
        replace(ease, grid={"l2": [1.0, 100.0, 1e6]}),
        TrainPart(validation.train_matrix()),
        validation.test_items,
        validation.evaluated_users,
        10,
    )
    assert len(tuned.trials) == 3
    assert tuned.validation_ndcg == max(ndcg for _, ndcg in tuned.trials)
    assert tuned.params == max(tuned.trials, key=lambda trial: trial[1])[0]


def test_evaluate_runs_every_method_through_the_real_services(small: Dataset, tmp_path: Path) -> None:
    """The whole harness on generated data: baselines (one setting each), three retrieval
    variants and the full pipeline served by real processes; results.json as documented."""
    quick = [replace(b, grid={name: values[:1] for name, values in b.grid.items()}) for b in BASELINES]
    results = evaluate(small, "random", k=10, seed=42, out=tmp_path, baselines=quick)

    written = json.loads((tmp_path / "results.json").read_text())
    assert {"dataset", "protocol", "k", "seed", "methods"} <= set(written)
    names = {method["name"]: method for method in written["methods"]}
    assert set(names) == {
        "most-popular",
        "recent-popular",
        "item-knn",
        "ease",
        "als",
        "vitrine-retrieval-fused",
        "vitrine-retrieval-content",
        "vitrine-retrieval-collaborative",
        "vitrine-retrieval-sources",
        "vitrine",
    }
    for method in written["methods"]:
        assert method["kind"] == ("vitrine" if method["name"].startswith("vitrine") else "baseline")
        assert method["by_group"] == {}  # every user of a random split has train events
        assert {"ndcg@10", "precision@10", "recall@10", "map@10", "hit_rate@10", "coverage"} <= set(method["metrics"])
        assert all(0.0 <= value <= 1.0 for value in method["metrics"].values())
        assert method["seconds"] >= 0
    popular = names["most-popular"]["metrics"]["ndcg@10"]
    assert names["vitrine"]["metrics"]["ndcg@10"] > popular, "the full pipeline must beat most-popular here"
    assert names["vitrine"]["metrics"]["hit_rate@10"] > 0.3
    assert results.split["degraded"] == 0

    # The random protocol trains the ranker on label_draws draws, each against its own index.
    artifacts = tmp_path / "work" / "artifacts"
    draws = VitrineSettings().ranker_build.label_draws
    assert draws > 1
    for draw in range(draws):
        assert (artifacts / training_index_name(draw) / "CURRENT").is_file()
    ranker = json.loads(next((artifacts / "ranker").glob("*/manifest.json")).read_text())
    assert ranker["params"]["label_draws"] == draws
    per_draw = ranker["params"]["label_events_per_draw"]
    assert len(per_draw) == draws
    assert len(set(per_draw)) == 1  # as many labels per user in every draw
    assert ranker["metrics"]["train_requests"] % draws == 0  # every draw replays the same training users
    # Filling gaps is the task sessions help: every item model of the build fits them.
    assert ranker["params"]["item_model"]["session_weight"] > 0
    for index_name in ("index", "index-content", training_index_name(0)):
        index = json.loads(next((artifacts / index_name).glob("*/manifest.json")).read_text())["params"]
        assert index["item_model_session_gap_s"] in index["build"]["item_model"]["session_gaps_s"]
        # ...and where a gap may sit anywhere in a history, popularity is all-time counts.
        assert index["build"]["popularity_half_life_days"] is None

    # Retrieval servers that only answer by user (the build's training replay, the
    # evaluation's) never load the text model: ~8 s each (shared.commands.NO_TEXT_QUERIES).
    server_logs = [*(tmp_path / "work" / "logs").glob("index*.log"), *(artifacts / "logs").glob("retrieval-*.log")]
    assert len(server_logs) == len(RETRIEVAL_VARIANTS) + draws
    assert not [log.name for log in server_logs if "embedding model loaded" in log.read_text()]

    curve = [written["candidate_recall"][str(n)] for n in CANDIDATE_SIZES]
    assert curve == sorted(curve)
    assert curve[-1] > 0.5
    assert written["feature_importance"]
    assert "| **vitrine** |" in (tmp_path / "results.md").read_text()
    for plot in ("metrics.png", "candidate_recall.png", "feature_importance.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
