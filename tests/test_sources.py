"""Candidate sources, their merge by quota, declared preferences and filtered search, through
the real retrieval and ranking servers on loopback (generated data)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest

from ranking_service.retrieval_client import RetrievalOptions, ShardedRetrievalClient
from retrieval_service.artifact import load_index_artifact
from retrieval_service.retriever import Retriever
from retrieval_service.server import start_retrieval_server
from retrieval_service.source_tables import EMPTY_NEIGHBOURS
from retrieval_service.sources import PopularSource, SourceAnswer, SourceQuery, merge, quotas
from shared.artifacts import open_current
from shared.config import IndexBuildSettings, ItemModelSettings, RetrievalSettings, SourceShare, VitrineSettings
from shared.data import PURCHASE, VIEW, Dataset, Events
from shared.evaluation.baselines import EASE_BASELINE
from shared.interactions import EVENT_CONFIDENCE, decayed_counts
from shared.item_model import fit_item_model
from shared.proto.vitrine.v1 import catalog_pb2, ranking_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.conftest import BuiltArtifacts, Servers, users_by_activity

TIMEOUT_S = 10
SOURCES = ("fused", "content", "collaborative", "covisitation", "item_model", "trending", "trending_category")


def _only(source: str) -> list[retrieval_pb2.SourceQuota]:
    return [retrieval_pb2.SourceQuota(source=source, share=1.0)]


def _history(dataset: Dataset, user_rank: int = 0, length: int = 10) -> list[str]:
    """A user's last ``length`` distinct items, newest first."""
    user = dataset.users.index_of()[users_by_activity(dataset)[user_rank]]
    events = dataset.events
    rows = events.item_index[events.user_index == user][::-1]
    _, first = np.unique(rows, return_index=True)
    ordered = rows[np.sort(first)][:length]
    return [str(dataset.catalog.item_ids[row]) for row in ordered]


def _attributes(dataset: Dataset) -> dict[str, tuple[str, str, float]]:
    catalog = dataset.catalog
    return {
        item: (brand, category, price)
        for item, brand, category, price in zip(
            catalog.item_ids.tolist(),
            catalog.brands.tolist(),
            catalog.categories.tolist(),
            catalog.prices.tolist(),
            strict=True,
        )
    }


def _retrieve(servers: Servers, **fields: Any) -> retrieval_pb2.RetrieveResponse:
    response: retrieval_pb2.RetrieveResponse = servers.retrieval.Retrieve(
        retrieval_pb2.RetrieveRequest(**fields), timeout=TIMEOUT_S
    )
    return response


def _rejected(servers: Servers, **fields: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _retrieve(servers, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


# -- popularity ----------------------------------------------------------------------------

DAY_S = 86_400


def _timed_events(items: Sequence[int], ages_days: Sequence[float], codes: Sequence[int], now: int) -> Events:
    n = len(items)
    return Events(
        user_index=np.arange(n, dtype=np.int32),
        item_index=np.asarray(items, np.int32),
        event_code=np.asarray(codes, np.int8),
        timestamp=np.asarray([now - int(age * DAY_S) for age in ages_days], np.int64),
        device=np.full(n, "web"),
        session_id=np.full(n, "s"),
    )


def test_popularity_counts_intent_decays_with_age_and_leans_on_all_time_shares_when_recent_is_thin() -> None:
    now = 1_000 * DAY_S
    # Item 0: six views a year ago; item 1: one view today; item 2: one purchase 14 days ago.
    events = _timed_events([0] * 6 + [1, 2], [365] * 6 + [0, 14], [VIEW] * 7 + [PURCHASE], now)
    all_time = decayed_counts(events, 4, now, None)
    purchase = EVENT_CONFIDENCE[PURCHASE]
    np.testing.assert_allclose(all_time, [6.0, 1.0, purchase, 0.0])
    recent = decayed_counts(events, 4, now, 14.0)
    np.testing.assert_allclose(recent, [6 * 0.5 ** (365 / 14), 1.0, purchase / 2, 0.0], rtol=1e-5)
    # The prior adds prior_weight spread by all-time shares (item 0's share: 6 of 12).
    shrunk = decayed_counts(events, 4, now, 14.0, prior_weight=120.0)
    np.testing.assert_allclose(shrunk, recent + 120.0 * all_time / all_time.sum(), rtol=1e-5)
    # Little recent weight (3.5 here) against the prior: the all-time order decides...
    assert np.argsort(-recent).tolist()[:3] == [2, 1, 0]
    assert np.argsort(-shrunk).tolist()[:3] == [0, 2, 1]
    # ...and much recent weight outweighs it.
    busy = _timed_events([0] * 6 + [1] * 200, [365] * 6 + [0] * 200, [VIEW] * 206, now)
    assert np.argmax(decayed_counts(busy, 4, now, 14.0, prior_weight=120.0)) == 1
    assert not decayed_counts(busy.select(np.zeros(206, bool)), 4, now, 14.0, prior_weight=120.0).any()


def test_popularity_decays_only_for_next_event_tasks() -> None:
    settings = IndexBuildSettings(item_model=ItemModelSettings(session_weight=3.0))
    for next_events in ("global", "per_user"):
        adapted = settings.for_label_split(next_events)
        assert adapted.popularity_half_life_days == settings.popularity_half_life_days
        assert adapted.item_model == settings.item_model.for_label_split(next_events)
    gap_filling = settings.for_label_split("random")
    assert gap_filling.popularity_half_life_days is None
    assert gap_filling.item_model == settings.item_model
    assert gap_filling.model_copy(update={"popularity_half_life_days": 14.0}) == settings


# -- the merge itself ----------------------------------------------------------------------


def test_quotas_add_up_and_follow_the_shares() -> None:
    assert quotas([0.7, 0.2, 0.1], 10) == [7, 2, 1]
    assert sum(quotas([1.0, 1.0, 1.0], 100)) == 100
    assert quotas([0.0, 1.0], 5) == [0, 5]


def test_merge_deduplicates_tags_every_source_and_lets_unused_quota_flow() -> None:
    answers = {
        "fused": SourceAnswer(np.arange(0, 10), np.linspace(1, 0.1, 10).astype(np.float32)),
        # Proposes 3 of fused's items and only 2 of its own: its unused quota flows to fused.
        "covisitation": SourceAnswer(np.asarray([2, 100, 3, 101, 4]), np.asarray([5, 4, 3, 2, 1], np.float32)),
    }
    merged = merge(answers, {"fused": 0.5, "covisitation": 0.5}, 8)
    rows = merged.rows.tolist()
    assert len(rows) == len(set(rows)) == 8
    assert {100, 101} <= set(rows)
    tagged = dict(zip(rows, merged.sources, strict=True))
    assert set(tagged[2]) == {"ann", "covisitation"}
    scores = dict(zip(rows, merged.source_scores, strict=True))
    assert len(scores[2]) == 2
    assert merged.primary[rows.index(100)] == "covisitation"


# -- every source through the server -----------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_alone_returns_n_tagged_candidates(servers: Servers, dataset: Dataset, source: str) -> None:
    history = _history(dataset)
    response = _retrieve(servers, history=retrieval_pb2.ItemHistory(item_ids=history), n=50, mix=_only(source))
    ids = [c.item_id for c in response.candidates]
    assert len(ids) == 50
    assert len(set(ids)) == 50
    tag = "ann" if source == "fused" else source
    assert all(tag in c.sources for c in response.candidates)
    assert all(len(c.sources) == len(c.source_scores) for c in response.candidates)
    # Best first by the query's inner product, whatever the source.
    scores = [c.score for c in response.candidates]
    assert scores == sorted(scores, reverse=True)


def test_sources_propose_sensible_items(servers: Servers, dataset: Dataset, settings: VitrineSettings) -> None:
    history = _history(dataset, length=5)
    attributes = _attributes(dataset)
    query = retrieval_pb2.ItemHistory(item_ids=history)

    covisited = _retrieve(servers, history=query, n=30, mix=_only("covisitation")).candidates
    # Co-visited items are led by history items (the anchors), strongest first.
    assert all(c.anchor_item_ids and set(c.anchor_item_ids) <= set(history) for c in covisited)
    first_scores = [c.source_scores[list(c.sources).index("covisitation")] for c in covisited]
    assert max(first_scores) > 0

    by_category = _retrieve(servers, history=query, n=30, mix=_only("trending_category")).candidates
    history_categories = {attributes[item][1] for item in history}
    assert {attributes[c.item_id][1] for c in by_category} <= history_categories

    # Trending: the items with the most decayed interactions as of the build (the newest event).
    trending = _retrieve(servers, history=query, n=30, mix=_only("trending")).candidates
    events = dataset.events
    counts = decayed_counts(
        events, len(dataset.catalog), int(events.timestamp.max()) + 1, settings.index_build.trending_half_life_days
    )
    expected = dataset.catalog.item_ids[np.argsort(-counts, kind="stable")[:30]].tolist()
    assert {c.item_id for c in trending} == set(expected)


def test_item_model_source_is_ease_over_the_history(
    servers: Servers, artifacts: BuiltArtifacts, dataset: Dataset
) -> None:
    """The item_model source proposes the items with the largest sums of the index's EASE
    weights over the history items, each item counting once whatever its weight."""
    manifest = open_current(artifacts.root, "index").manifest["params"]
    # Tuned by the build.
    assert manifest["item_model_l2"] in EASE_BASELINE.grid["l2"]
    assert manifest["item_model_session_gap_s"] in manifest["build"]["item_model"]["session_gaps_s"]
    model = fit_item_model(
        dataset.events.before(manifest["cutoff"]),
        len(dataset.catalog),
        ItemModelSettings.model_validate(
            {
                **manifest["build"]["item_model"],
                "l2": manifest["item_model_l2"],
                "session_gap_s": manifest["item_model_session_gap_s"],
            }
        ),
    )
    assert model is not None
    history = _history(dataset, length=8)
    row_of = {item: row for row, item in enumerate(dataset.catalog.item_ids.tolist())}
    history_rows = [row_of[item] for item in history]
    expected_scores = np.asarray(model[history_rows].sum(axis=0)).ravel()
    weights = np.linspace(1.0, 0.1, len(history)).tolist()  # ignored by this source
    answer = _retrieve(
        servers, history=retrieval_pb2.ItemHistory(item_ids=history, weights=weights), n=30, mix=_only("item_model")
    )
    expected = np.lexsort((np.arange(len(expected_scores)), -expected_scores))[:30]
    assert {c.item_id for c in answer.candidates} == set(dataset.catalog.item_ids[expected].tolist())
    for candidate in answer.candidates:
        score = candidate.source_scores[list(candidate.sources).index("item_model")]
        assert score == pytest.approx(expected_scores[row_of[candidate.item_id]], rel=1e-4, abs=1e-6)
        assert candidate.anchor_item_ids
        assert set(candidate.anchor_item_ids) <= set(history)


def test_default_mix_without_an_item_model_is_the_fused_answer(
    artifacts: BuiltArtifacts, dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index without an item model (too many items for one) answers the default mix
    exactly as the fused source alone, on the fused-only path (no quota merge)."""
    loaded = load_index_artifact(artifacts.root)
    loaded.tables = replace(loaded.sources, item_model=EMPTY_NEIGHBOURS)
    default = Retriever(loaded, max_candidates=500, max_exclusions=100)
    fused_only = Retriever(loaded, max_candidates=500, max_exclusions=100, mix=[SourceShare(source="fused", share=1.0)])
    history = _history(dataset)

    def no_merge(*args: object) -> None:
        raise AssertionError("the quota merge ran")

    monkeypatch.setattr("retrieval_service.retriever.merge", no_merge)
    ours = default.by_history(history, [], 100, [])
    expected = fused_only.by_history(history, [], 100, [])
    assert ours.item_ids == expected.item_ids
    assert ours.scores == expected.scores
    assert {tag for tags in ours.sources for tag in tags} == {"ann"}


MEASURED_MIX = [
    retrieval_pb2.SourceQuota(source="fused", share=0.5),
    retrieval_pb2.SourceQuota(source="collaborative", share=0.3),
    retrieval_pb2.SourceQuota(source="covisitation", share=0.2),
]


def test_configured_mix_merges_sources_without_duplicates_and_reaches_n(
    tmp_path_factory: pytest.TempPathFactory, artifacts: BuiltArtifacts, dataset: Dataset
) -> None:
    """A server configured with the measured three-source mix (retrieval.sources)."""
    mix = [SourceShare(source=q.source, share=q.share) for q in MEASURED_MIX]
    server = start_retrieval_server(
        RetrievalSettings(
            artifacts=artifacts.root, port=0, metrics_port=None, text_queries=False, max_candidates=500, sources=mix
        ),
        VitrineSettings().embedding,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        history = _history(dataset)
        response = stub.Retrieve(
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=history), n=200),
            timeout=TIMEOUT_S,
        )
        _check_mix(response, mix)
    finally:
        channel.close()
        server.stop()


def _check_mix(response: retrieval_pb2.RetrieveResponse, mix: list[SourceShare]) -> None:
    ids = [c.item_id for c in response.candidates]
    assert len(ids) == len(set(ids)) == 200
    tags = Counter(tag for c in response.candidates for tag in c.sources)
    # Each source of the configured mix fills at least its share (the items it proposed that
    # another source took first are tagged with it too).
    total = sum(entry.share for entry in mix)
    for entry in mix:
        tag = "ann" if entry.source == "fused" else entry.source
        assert tags[tag] >= int(200 * entry.share / total), entry.source
    assert all(c.source == c.sources[0] for c in response.candidates)


def test_mix_per_request_honours_quotas(servers: Servers, dataset: Dataset) -> None:
    history = _history(dataset)
    mix = [
        retrieval_pb2.SourceQuota(source="fused", share=0.5),
        retrieval_pb2.SourceQuota(source="trending", share=0.5),
    ]
    response = _retrieve(servers, history=retrieval_pb2.ItemHistory(item_ids=history), n=100, mix=mix)
    tags = Counter(tag for c in response.candidates for tag in c.sources)
    assert len(response.candidates) == 100
    assert tags["ann"] >= 50
    assert tags["trending"] >= 50
    assert set(tags) == {"ann", "trending"}


def test_unused_quota_flows_so_n_is_reached(servers: Servers, dataset: Dataset) -> None:
    # One history item has a few dozen co-visited items at most: fused fills the rest.
    history = _history(dataset, length=1)
    mix = [
        retrieval_pb2.SourceQuota(source="covisitation", share=0.9),
        retrieval_pb2.SourceQuota(source="fused", share=0.1),
    ]
    response = _retrieve(servers, history=retrieval_pb2.ItemHistory(item_ids=history), n=300, mix=mix)
    tags = Counter(tag for c in response.candidates for tag in c.sources)
    assert len(response.candidates) == 300
    assert 0 < tags["covisitation"] < 270


def test_anchors_are_history_items(servers: Servers, dataset: Dataset) -> None:
    history = _history(dataset, user_rank=3)
    response = _retrieve(servers, history=retrieval_pb2.ItemHistory(item_ids=history), n=100)
    anchored = [c for c in response.candidates if c.anchor_item_ids]
    assert len(anchored) >= 80
    assert all(set(c.anchor_item_ids) <= set(history) and len(c.anchor_item_ids) <= 3 for c in anchored)
    assert all(len(set(c.anchor_item_ids)) == len(c.anchor_item_ids) for c in anchored)


def test_a_known_user_gets_anchors_from_the_stored_history(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[0]
    row = dataset.users.index_of()[user]
    touched = set(dataset.catalog.item_ids[dataset.events.item_index[dataset.events.user_index == row]].tolist())
    response = _retrieve(servers, user_id=user, n=50)
    anchors = {a for c in response.candidates for a in c.anchor_item_ids}
    assert anchors
    assert anchors <= touched


def test_session_items_feed_an_unknown_user(servers: Servers, dataset: Dataset) -> None:
    session = _history(dataset, length=2)
    response = _retrieve(servers, user_id="stranger-with-a-session", n=40, session_item_ids=session, mix=MEASURED_MIX)
    sources = {c.source for c in response.candidates}
    assert "popular" not in sources
    assert any("covisitation" in c.sources for c in response.candidates)
    assert {a for c in response.candidates for a in c.anchor_item_ids} <= set(session)


def test_candidates_carry_the_stock_of_the_artifact(servers: Servers, dataset: Dataset) -> None:
    stock = dict(zip(dataset.catalog.item_ids.tolist(), dataset.catalog.stock.tolist(), strict=True))
    response = _retrieve(servers, user_id=users_by_activity(dataset)[1], n=30)
    assert [c.stock for c in response.candidates] == [stock[c.item_id] for c in response.candidates]


# -- filters -----------------------------------------------------------------------------


def _narrow_band(dataset: Dataset) -> tuple[str, float, float, list[str]]:
    """A brand and a price band around its median: a very selective filter."""
    catalog = dataset.catalog
    brand = Counter(catalog.brands.tolist()).most_common(1)[0][0]
    prices = np.sort(catalog.prices[catalog.brands == brand])
    low, high = float(prices[len(prices) // 4]), float(prices[len(prices) // 2])
    mask = (catalog.brands == brand) & (catalog.prices >= low) & (catalog.prices <= high)
    return brand, low, high, catalog.item_ids[mask].tolist()


def test_a_restrictive_filter_still_returns_n_matching_items(servers: Servers, dataset: Dataset) -> None:
    brand, low, high, matching = _narrow_band(dataset)
    assert len(matching) >= 3
    item_filter = catalog_pb2.ItemFilter(brands=[brand], price_min=low, price_max=high)
    for mix in ([], _only("fused"), _only("content"), _only("trending")):
        response = _retrieve(
            servers,
            history=retrieval_pb2.ItemHistory(item_ids=_history(dataset)),
            n=len(matching),
            filter=item_filter,
            mix=mix,
        )
        ids = [c.item_id for c in response.candidates]
        if mix and mix[0].source == "trending":
            assert set(ids) <= set(matching)  # only the items that trend at all
        else:
            assert sorted(ids) == sorted(matching)


def test_filter_by_category_and_stock(servers: Servers, dataset: Dataset) -> None:
    catalog = dataset.catalog
    category = str(catalog.categories[0])
    response = _retrieve(
        servers,
        user_id=users_by_activity(dataset)[2],
        n=40,
        filter=catalog_pb2.ItemFilter(categories=[category], in_stock_only=True),
    )
    attributes = _attributes(dataset)
    assert len(response.candidates) == min(40, int(((catalog.categories == category) & (catalog.stock > 0)).sum()))
    assert all(attributes[c.item_id][1] == category and c.stock > 0 for c in response.candidates)


def test_similar_items_honours_a_filter(servers: Servers, dataset: Dataset) -> None:
    brand, low, high, matching = _narrow_band(dataset)
    item = str(dataset.catalog.item_ids[0])
    response = servers.retrieval.SimilarItems(
        retrieval_pb2.SimilarItemsRequest(
            item_id=item, n=5, filter=catalog_pb2.ItemFilter(brands=[brand], price_min=low, price_max=high)
        ),
        timeout=TIMEOUT_S,
    )
    ids = [c.item_id for c in response.candidates]
    assert len(ids) == min(5, len([m for m in matching if m != item]))
    assert set(ids) <= set(matching) - {item}


# -- declared preferences -----------------------------------------------------------------


def test_a_new_user_with_declared_brand_gets_that_brand(servers: Servers, dataset: Dataset) -> None:
    brand = Counter(dataset.catalog.brands.tolist()).most_common(1)[0][0]
    response = _retrieve(servers, preferences=catalog_pb2.DeclaredPreferences(brands=[brand]), n=10)
    attributes = _attributes(dataset)
    assert len(response.candidates) == 10
    assert all(attributes[c.item_id][0] == brand for c in response.candidates)
    assert "popular" not in {c.source for c in response.candidates}


def test_preferences_brand_or_category_within_the_price_band(servers: Servers, dataset: Dataset) -> None:
    catalog = dataset.catalog
    brand, category = str(catalog.brands[5]), str(catalog.categories[100])
    high = float(np.median(catalog.prices))
    preferences = catalog_pb2.DeclaredPreferences(brands=[brand], categories=[category], price_max=high)
    response = _retrieve(servers, preferences=preferences, n=30)
    attributes = _attributes(dataset)
    assert response.candidates
    for candidate in response.candidates:
        item_brand, item_category, price = attributes[candidate.item_id]
        assert item_brand == brand or item_category == category
        assert price <= high


def test_recommend_for_a_new_user_with_preferences_end_to_end(servers: Servers, dataset: Dataset) -> None:
    brand = Counter(dataset.catalog.brands.tolist()).most_common(1)[0][0]
    response = servers.ranking.Recommend(
        ranking_pb2.RecommendRequest(
            user_id="brand-new-user", k=10, preferences=catalog_pb2.DeclaredPreferences(brands=[brand])
        ),
        timeout=TIMEOUT_S,
    )
    assert len(response.items) == 10
    assert {item.brand for item in response.items} == {brand}
    assert response.cold_start


def test_recommend_passes_the_filter_to_retrieval(servers: Servers, dataset: Dataset) -> None:
    category = str(dataset.catalog.categories[0])
    response = servers.ranking.Recommend(
        ranking_pb2.RecommendRequest(
            user_id=users_by_activity(dataset)[0], k=10, filter=catalog_pb2.ItemFilter(categories=[category])
        ),
        timeout=TIMEOUT_S,
    )
    assert response.items
    assert {item.category for item in response.items} == {category}


# -- validation ------------------------------------------------------------------------------


def test_bad_mix_is_rejected_naming_the_source(servers: Servers, dataset: Dataset) -> None:
    history = retrieval_pb2.ItemHistory(item_ids=_history(dataset, length=2))
    error = _rejected(servers, history=history, n=10, mix=_only("astrology"))
    assert "astrology" in (error.details() or "")
    _rejected(servers, history=history, n=10, mix=[retrieval_pb2.SourceQuota(source="fused", share=-1.0)])
    _rejected(servers, history=history, n=10, mix=[retrieval_pb2.SourceQuota(source="fused", share=0.0)])


def test_bad_filters_and_preferences_are_rejected(servers: Servers, dataset: Dataset) -> None:
    history = retrieval_pb2.ItemHistory(item_ids=_history(dataset, length=2))
    error = _rejected(servers, history=history, n=10, filter=catalog_pb2.ItemFilter(brands=["No Such Brand"]))
    assert "No Such Brand" in (error.details() or "")
    assert sorted(set(dataset.catalog.brands.tolist()))[0] in (error.details() or "")  # a few known names are listed
    _rejected(servers, history=history, n=10, filter=catalog_pb2.ItemFilter(price_min=10.0, price_max=5.0))
    _rejected(servers, preferences=catalog_pb2.DeclaredPreferences(), n=10)
    _rejected(servers, preferences=catalog_pb2.DeclaredPreferences(price_max=50.0), n=10)
    error = _rejected(servers, preferences=catalog_pb2.DeclaredPreferences(categories=["moon rocks"]), n=10)
    assert "moon rocks" in (error.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        servers.ranking.Recommend(
            ranking_pb2.RecommendRequest(user_id="x", k=5, preferences=catalog_pb2.DeclaredPreferences()),
            timeout=TIMEOUT_S,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the artifact ---------------------------------------------------------------------------


def test_source_tables_are_checksummed_npy_files(artifacts: BuiltArtifacts) -> None:
    artifact = open_current(artifacts.root, "index")
    files = artifact.manifest["files"]
    for name in (
        "covisitation_indptr.npy",
        "covisitation_neighbours.npy",
        "covisitation_scores.npy",
        "covisitation_anchor_ids.npy",
        "item_trending.npy",
        "item_categories.npy",
        "item_brands.npy",
        "item_prices.npy",
        "item_stock.npy",
        "user_history_vocabulary.npy",
        "user_history_codes.npy",
    ):
        assert name in files
        assert files[name]["sha256"]
    neighbours = artifact.load_array("covisitation_neighbours.npy")
    assert neighbours.dtype == np.int32
    assert len(neighbours) > 0


def test_stored_histories_are_each_users_newest_items(
    artifacts: BuiltArtifacts, dataset: Dataset, settings: VitrineSettings
) -> None:
    """The anchors of a user_id query: the newest stored_history_length events' items,
    stored as codes into one vocabulary of ids."""
    loaded = load_index_artifact(artifacts.root)
    cutoff = open_current(artifacts.root, "index").manifest["params"]["cutoff"]
    events = dataset.events.before(cutoff)
    length = settings.index_build.stored_history_length
    assert len(loaded.sources.user_history_vocabulary) < len(loaded.sources.user_history_codes)
    for user_id in users_by_activity(dataset)[:5]:
        user = dataset.users.index_of()[user_id]
        mine = np.flatnonzero(events.user_index == user)
        newest = mine[np.argsort(-events.timestamp[mine], kind="stable")][:length]
        stored, weights = loaded.sources.user_history(loaded.user_row[user_id])
        assert len(stored) == len(weights) == min(length, len(mine))
        # Same items (ties in time may order them differently).
        assert sorted(stored) == sorted(dataset.catalog.item_ids[events.item_index[newest]].tolist())


def test_scatter_gather_client_passes_filter_and_session(servers: Servers, dataset: Dataset) -> None:
    """The two-step sharded client (here over one shard) sends the filter, mix and session
    items with its vector step, and parses sources, anchors and stock."""
    category = str(dataset.catalog.categories[0])
    client = ShardedRetrievalClient(
        [f"127.0.0.1:{servers.retrieval_server.port}"], query_share=0.4, service="test-sources"
    )
    try:
        history = _history(dataset, length=5)
        options = RetrievalOptions(
            item_filter=catalog_pb2.ItemFilter(categories=[category]), session_item_ids=history[:2]
        )
        answer = client.by_history(history, [1.0] * len(history), 30, [], TIMEOUT_S, options)
        attributes = _attributes(dataset)
        assert answer.item_ids
        assert {attributes[item][1] for item in answer.item_ids} == {category}
        assert len(answer.sources) == len(answer.item_ids) == len(answer.anchor_ids)
        assert answer.stock is not None
        assert len(answer.stock) == len(answer.item_ids)
        brand = Counter(dataset.catalog.brands.tolist()).most_common(1)[0][0]
        preferred = client.by_preferences(catalog_pb2.DeclaredPreferences(brands=[brand]), 10, [], TIMEOUT_S)
        assert {attributes[item][0] for item in preferred.item_ids} == {brand}
    finally:
        client.close()


@pytest.mark.parametrize("mix", [[], MEASURED_MIX], ids=["configured mix", "every source"])
def test_without_anchors_the_same_candidates_come_without_them(
    servers: Servers, dataset: Dataset, mix: list[retrieval_pb2.SourceQuota]
) -> None:
    history = retrieval_pb2.ItemHistory(item_ids=_history(dataset, user_rank=3))
    for columnar in (False, True):
        anchored = _retrieve(servers, history=history, n=100, mix=mix, columnar=columnar)
        bare = _retrieve(servers, history=history, n=100, mix=mix, columnar=columnar, without_anchors=True)
        assert bare.columns.item_ids == anchored.columns.item_ids
        assert bare.columns.scores == anchored.columns.scores
        assert [(c.item_id, c.score, list(c.sources)) for c in bare.candidates] == [
            (c.item_id, c.score, list(c.sources)) for c in anchored.candidates
        ]
        assert any(c.anchor_item_ids for c in anchored.candidates) or any(anchored.columns.anchors)
        assert not any(c.anchor_item_ids for c in bare.candidates)
        assert not bare.columns.anchors
        assert not bare.columns.anchor_item_ids


def test_popular_source_reads_only_the_head_it_needs_and_answers_as_a_full_scan(
    artifacts: BuiltArtifacts,
) -> None:
    loaded = load_index_artifact(artifacts.root)
    source = PopularSource(loaded)
    exclude = np.sort(loaded.popular_rows[[0, 2, 5, 40]].astype(np.int64))
    unfiltered = SourceQuery(
        vector=None,
        anchor_ids=(),
        anchor_weights=np.zeros(0),
        allowed=None,
        exclude=exclude,
        exact_filter_below=0,
    )
    # A filter that allows everything takes the full scan: the same answer.
    everything = replace(unfiltered, allowed=np.ones(loaded.index.size, dtype=bool))
    for n in (1, 10, 50):
        head, scan = source.propose(unfiltered, n), source.propose(everything, n)
        assert head.rows.tolist() == scan.rows.tolist()
        assert head.scores.tolist() == scan.scores.tolist()
        assert len(head.rows) == n
        assert not np.isin(head.rows, exclude).any()
