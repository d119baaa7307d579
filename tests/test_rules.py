"""Business rules after the model: each rule component on hand-made arrays, the chain, then
the rules through real servers on loopback (configured, per surface and per request)."""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking_service.rules import (
    AllowedBrands,
    Boosts,
    BrandBoundary,
    Candidates,
    ExcludeIds,
    ExcludeSeen,
    MaxPerBrand,
    MaxPerCategory,
    Mmr,
    NotLaunched,
    OutOfStock,
    Pins,
    Ranked,
    RuleContext,
    apply_chain,
    build_chain,
    merge_rules,
    parse_overrides,
)
from ranking_service.store import ItemTable, UserHistory
from shared.config import RankingSettings, RulesOverrides, RulesSettings, load_settings
from shared.data import PURCHASE, VIEW, Dataset
from shared.errors import InvalidArgument
from shared.proto.vitrine.v1 import ranking_pb2
from tests.conftest import BuiltArtifacts, Servers, users_by_activity
from tests.fakes import HashingEmbedder
from tests.ranking_helpers import ranking_server, recommend

NOW = 1_000_000
DAY = 86_400
BRANDS = ["Acme", "Acme", "Bolt", "Bolt", "Cora", "Cora", "Dune", "Dune"]
CATEGORIES = ["tools", "tools", "tools", "garden", "garden", "kitchen", "kitchen", "kitchen"]


def _vectors() -> npt.NDArray[np.float16]:
    # Items 0-3 nearly identical (one direction), 4-7 each in its own direction.
    vectors = np.zeros((8, 8), dtype=np.float32)
    vectors[:4, 0] = 1.0
    vectors[:4, 1] = np.linspace(0.0, 0.1, 4)
    for row in range(4, 8):
        vectors[row, row] = 1.0
    unit: npt.NDArray[np.float16] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    return unit


def _items() -> ItemTable:
    brands = np.asarray(BRANDS)
    categories = np.asarray(CATEGORIES)
    return ItemTable(
        item_ids=np.asarray([f"i{row}" for row in range(8)]),
        titles=np.asarray([f"Item {row}" for row in range(8)]),
        brands=brands,
        categories=categories,
        category_codes=np.unique(categories, return_inverse=True)[1].astype(np.int32),
        brand_codes=np.unique(brands, return_inverse=True)[1].astype(np.int32),
        prices=np.ones(8),
        stock=np.ones(8, dtype=np.int64),
        created_at=np.zeros(8, dtype=np.int64),
        content_vectors=_vectors(),
    )


ITEMS = _items()
ITEM_ROW = ITEMS.row_of()


def _candidates(scores: list[float] | None = None, stock: list[int] | None = None) -> Candidates:
    """All 8 items as candidates, scored 8, 7, ... 1 (row 0 best) unless told otherwise."""
    values = scores if scores is not None else [8.0 - row for row in range(8)]
    return Candidates(
        rows=np.arange(8, dtype=np.int32),
        scores=np.asarray(values, dtype=np.float32),
        stock=np.asarray(stock if stock is not None else [1] * 8, dtype=np.int64),
    )


def _context(
    k: int = 8,
    history: UserHistory | None = None,
    session: list[int] | None = None,
    excluded: list[int] | None = None,
) -> RuleContext:
    return RuleContext(
        items=ITEMS,
        history=history or UserHistory.empty(),
        session_rows=np.asarray(session or [], dtype=np.int32),
        excluded_rows=np.asarray(excluded or [], dtype=np.int32),
        now=NOW,
        k=k,
    )


def _ranked(candidates: Candidates) -> Ranked:
    return Ranked(np.argsort(-candidates.scores, kind="stable").astype(np.int64), candidates.scores)


def _order(ranked: Ranked) -> list[int]:
    return [int(position) for position in ranked.order]


def test_exclude_seen_by_type_and_window() -> None:
    history = UserHistory(
        item_rows=np.asarray([1, 2, 3], np.int32),
        event_codes=np.asarray([VIEW, PURCHASE, PURCHASE], np.int8),
        timestamps=np.asarray([NOW - DAY, NOW - 2 * DAY, NOW - 100 * DAY], np.int64),
    )
    candidates = _candidates()
    context = _context(history=history, session=[5])
    forever = ExcludeSeen(("purchase",), 0).apply(_ranked(candidates), candidates, context)
    assert _order(forever) == [0, 1, 4, 5, 6, 7]
    recent = ExcludeSeen(("purchase",), 30).apply(_ranked(candidates), candidates, context)
    assert _order(recent) == [0, 1, 3, 4, 5, 6, 7]
    views = ExcludeSeen(("view",), 0).apply(_ranked(candidates), candidates, context)
    assert _order(views) == [0, 2, 3, 4, 6, 7]  # a session item counts as viewed now


def test_exclude_ids_and_out_of_stock() -> None:
    candidates = _candidates(stock=[1, 0, 1, 1, 1, 1, 0, 1])
    context = _context(excluded=[2, 7])
    assert _order(ExcludeIds().apply(_ranked(candidates), candidates, context)) == [0, 1, 3, 4, 5, 6]
    assert _order(OutOfStock().apply(_ranked(candidates), candidates, context)) == [0, 2, 3, 4, 5, 7]


def test_not_launched_drops_items_created_after_the_request() -> None:
    later = dataclasses.replace(ITEMS, created_at=np.asarray([0, NOW + 1, NOW, 0, NOW + DAY, 0, 0, 0], np.int64))
    candidates = _candidates()
    context = dataclasses.replace(_context(), items=later)
    assert _order(NotLaunched().apply(_ranked(candidates), candidates, context)) == [0, 2, 3, 5, 6, 7]
    replayed_later = dataclasses.replace(context, now=NOW + DAY)
    assert _order(NotLaunched().apply(_ranked(candidates), candidates, replayed_later)) == list(range(8))


def test_allowed_brands_keeps_only_those() -> None:
    candidates = _candidates()
    kept = AllowedBrands(frozenset({"Cora", "Dune"})).apply(_ranked(candidates), candidates, _context())
    assert _order(kept) == [4, 5, 6, 7]


def test_boosts_multiply_scores_also_negative_ones() -> None:
    candidates = _candidates(scores=[-1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0, -4.5])
    boosted = Boosts({"i7": 100.0}, {"Bolt": 0.1}, {}).apply(_ranked(candidates), candidates, _context())
    # i7: -4.5 + ln 100 = 0.1 -> first; Bolt (rows 2, 3) - ln 10 -> below every other item.
    assert _order(boosted) == [7, 0, 1, 4, 5, 6, 2, 3]
    assert boosted.scores[7] == pytest.approx(-4.5 + np.log(100.0), abs=1e-5)


def test_brand_boundary_higher_scored_group_wins() -> None:
    rule = BrandBoundary(
        {"luxury": frozenset({"Cora"}), "budget": frozenset({"Acme", "Bolt"})}, (("luxury", "budget"),)
    )
    candidates = _candidates()
    assert _order(rule.apply(_ranked(candidates), candidates, _context())) == [0, 1, 2, 3, 6, 7]
    # Cora first: the budget brands go.
    cora_first = _candidates(scores=[1, 2, 3, 4, 9, 5, 0, 0])
    assert _order(rule.apply(_ranked(cora_first), cora_first, _context())) == [4, 5, 6, 7]


def test_caps_keep_the_best_per_brand_and_category() -> None:
    candidates = _candidates()
    assert _order(MaxPerBrand(1).apply(_ranked(candidates), candidates, _context())) == [0, 2, 4, 6]
    assert _order(MaxPerCategory(2).apply(_ranked(candidates), candidates, _context())) == [0, 1, 3, 4, 5, 6]
    # A pinned item neither counts nor is dropped.
    pinned = MaxPerBrand(1, frozenset({1})).apply(_ranked(candidates), candidates, _context())
    assert _order(pinned) == [0, 1, 2, 4, 6]


def test_mmr_spreads_near_duplicates() -> None:
    candidates = _candidates(scores=[1.0, 0.99, 0.98, 0.97, 0.5, 0.45, 0.4, 0.35])
    by_score = Mmr(1.0, 3).apply(_ranked(candidates), candidates, _context(k=4))
    assert _order(by_score)[:4] == [0, 1, 2, 3]
    diverse = Mmr(0.5, 3).apply(_ranked(candidates), candidates, _context(k=4))
    assert _order(diverse)[0] == 0
    assert set(_order(diverse)[1:4]) <= {4, 5, 6, 7}
    assert sorted(_order(diverse)) == list(range(8))


def test_pins_land_at_their_positions() -> None:
    candidates = _candidates()
    pinned = Pins({7: 0, 6: 2, 5: 100}).apply(_ranked(candidates), candidates, _context())
    assert _order(pinned) == [7, 0, 6, 1, 2, 3, 4, 5]


def test_chain_order_and_effects() -> None:
    settings = RulesSettings(
        exclude_seen_types=["purchase"],
        allowed_brands=["Acme", "Bolt", "Cora"],
        boosts=[{"item_id": "i5", "multiplier": 1000.0}],
        max_per_brand=1,
        pins=[{"item_id": "i3", "position": 1}],
    )
    history = UserHistory(np.asarray([0], np.int32), np.asarray([PURCHASE], np.int8), np.asarray([NOW], np.int64))
    outcome = apply_chain(
        build_chain(settings, ITEM_ROW), _candidates(stock=[1, 1, 0, 1, 1, 1, 1, 1]), _context(k=3, history=history)
    )
    # Purchased 0 and out-of-stock 2 go, Dune (6, 7) is not allowed, i5 boosted to first,
    # one per brand: Cora 5 then Acme 1 (Cora 4 goes); i3 pinned at 1, exempt from the cap.
    assert outcome.selected.tolist() == [5, 3, 1]
    effects = [(e.rule, e.removed, e.moved) for e in outcome.effects]
    assert effects == [
        ("exclude_seen", 1, 0),
        ("exclude_ids", 0, 0),
        ("not_launched", 0, 0),
        ("out_of_stock", 1, 0),
        ("allowed_brands", 2, 0),
        ("boosts", 0, 3),  # [1, 3, 4] -> [5, 1, 3]
        ("max_per_brand", 1, 0),
        ("pins", 0, 2),  # [5, 1, 3] -> [5, 3, 1]
    ]


def test_default_chain() -> None:
    chain = build_chain(RulesSettings(), ITEM_ROW)
    assert [rule.name for rule in chain] == ["exclude_seen", "exclude_ids", "not_launched", "out_of_stock"]
    history = UserHistory(np.asarray([0], np.int32), np.asarray([PURCHASE], np.int8), np.asarray([0], np.int64))
    outcome = apply_chain(
        chain, _candidates(stock=[1, 1, 1, 0, 1, 1, 1, 1]), _context(k=2, history=history, excluded=[2])
    )
    assert outcome.selected.tolist() == [1, 4]
    assert outcome.removed == {"exclude_seen": 1, "exclude_ids": 1, "not_launched": 0, "out_of_stock": 1}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mmr_lambda": 1.5}, "rules.mmr_lambda"),
        ({"mmr_lambda": -0.1}, "rules.mmr_lambda"),
        ({"mmr_lambda": float("nan")}, "rules.mmr_lambda"),
        ({"boosts": [{"brand": "Acme", "multiplier": float("inf")}]}, "rules.boosts[0].multiplier"),
        ({"max_per_brand": -1}, "rules.max_per_brand"),
        ({"boosts": [{"brand": "Acme", "multiplier": 0.0}]}, "rules.boosts[0].multiplier"),
        ({"boosts": [{"multiplier": 2.0}]}, "rules.boosts[0]"),
        ({"pins": [{"item_id": "i1", "position": -1}]}, "rules.pins[0].position"),
        ({"exclude_seen_types": ["bogus"]}, "rules.exclude_seen_types[0]"),
        ({"pins": [{"item_id": f"i{n}", "position": n} for n in range(101)]}, "rules.pins"),
    ],
)
def test_bad_overrides_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_overrides(fields)
    assert caught.value.field == field
    assert str(caught.value).startswith(field)


def test_overrides_layer_in_order() -> None:
    base = RulesSettings(max_per_brand=3, mmr_lambda=0.9)
    merged = merge_rules(base, [RulesOverrides(max_per_brand=2), RulesOverrides(mmr_lambda=0.5)])
    assert (merged.max_per_brand, merged.mmr_lambda, merged.exclude_seen_types) == (2, 0.5, ["purchase"])
    with pytest.raises(InvalidArgument, match="pins"):
        merge_rules(
            base, [parse_overrides({"pins": [{"item_id": "a", "position": 1}, {"item_id": "b", "position": 1}]})]
        )


def test_the_documented_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).parent.parent / "docs" / "rules.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "vitrine.yaml").write_text(example)
    monkeypatch.setenv("VITRINE_CONFIG", str(tmp_path / "vitrine.yaml"))
    ranking = load_settings().ranking
    assert ranking.rules.never_together == [("luxury", "budget")]
    assert set(ranking.surfaces) == {"house", "product_page", "home"}
    assert [variant.name for variant in ranking.experiments.variants] == ["diverse", "old-ranker"]


def test_config_is_checked_at_start() -> None:
    with pytest.raises(ValueError, match="brand groups"):
        RankingSettings(rules={"never_together": [["a", "b"]]})
    with pytest.raises(ValueError, match=r"ranking\.surfaces\.home"):
        RankingSettings(surfaces={"home": {"never_together": [["a", "b"]]}})
    settings = RankingSettings(
        rules={"brand_groups": {"a": ["A"], "b": ["B"]}},
        surfaces={"home": {"never_together": [["a", "b"]]}},
    )
    assert settings.rules.merged(settings.surfaces["home"]).never_together == [("a", "b")]


# -- through the real servers ------------------------------------------------------------------


def _brands_in_answers(servers: Servers, dataset: Dataset, users: list[str], k: int) -> list[str]:
    """Brands of the default answers to ``users``, most frequent first."""
    counts: collections.Counter[str] = collections.Counter()
    for user in users:
        counts.update(item.brand for item in recommend(servers.ranking, dataset, user, k).items)
    return [brand for brand, _ in counts.most_common()]


def test_brand_boundary_is_never_violated_across_many_users(
    artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset
) -> None:
    users = users_by_activity(dataset)[:190] + [f"new-user-{n}" for n in range(10)]
    frequent = _brands_in_answers(servers, dataset, users[:40], 10)[:8]
    groups = {"left": frequent[0::2], "right": frequent[1::2]}
    rules = {"brand_groups": groups, "never_together": [["left", "right"]]}
    violations_without = 0
    removed = 0
    with ranking_server(artifacts, servers, rules=rules) as stub:
        for user in users:
            with_rule = recommend(stub, dataset, user, 10)
            brands = {item.brand for item in with_rule.items}
            assert not (brands & set(groups["left"]) and brands & set(groups["right"])), (user, brands)
            assert len(with_rule.items) == 10
            effect = {e.rule: e for e in with_rule.rule_effects}["brand_boundary"]
            removed += effect.removed
            without = {item.brand for item in recommend(servers.ranking, dataset, user, 10).items}
            violations_without += bool(without & set(groups["left"]) and without & set(groups["right"]))
    print(f"\nbrand boundary: {violations_without}/{len(users)} default lists mix the groups; 0 with the rule")
    assert violations_without >= 10, "the groups should meet in default answers, or the test proves nothing"
    assert removed > 0


def _pairwise_distance(vectors: npt.NDArray[np.float32]) -> float:
    similarity = vectors @ vectors.T
    upper = np.triu_indices(len(vectors), k=1)
    return float(np.mean(1.0 - similarity[upper]))


def test_mmr_raises_intra_list_diversity(servers: Servers, dataset: Dataset, embedder: HashingEmbedder) -> None:
    vectors = embedder.encode(dataset.catalog.embedding_texts()).astype(np.float32)
    row_of = dataset.catalog.index_of()
    distances: dict[float, list[float]] = {1.0: [], 0.5: []}
    for user in users_by_activity(dataset)[:80]:
        for lam in distances:
            response = recommend(servers.ranking, dataset, user, 10, rules=ranking_pb2.RuleOverrides(mmr_lambda=lam))
            rows = [row_of[item.item_id] for item in response.items]
            distances[lam].append(_pairwise_distance(vectors[rows]))
            if lam < 1:
                assert [e.rule for e in response.rule_effects][-1] == "mmr"
    by_score, diverse = float(np.mean(distances[1.0])), float(np.mean(distances[0.5]))
    print(f"\nmean pairwise content distance of the top 10: lambda=1 {by_score:.3f}, lambda=0.5 {diverse:.3f}")
    assert diverse >= by_score * 1.05, (by_score, diverse)
    assert np.mean(np.asarray(distances[0.5]) > np.asarray(distances[1.0])) >= 0.8


def test_caps_hold(servers: Servers, dataset: Dataset) -> None:
    for user in users_by_activity(dataset)[:20]:
        response = recommend(
            servers.ranking,
            dataset,
            user,
            10,
            rules=ranking_pb2.RuleOverrides(max_per_brand=1, max_per_category=3),
        )
        assert len(response.items) == 10
        assert max(collections.Counter(item.brand for item in response.items).values()) == 1
        assert max(collections.Counter(item.category for item in response.items).values()) <= 3
        names = [e.rule for e in response.rule_effects]
        assert names == [
            "exclude_seen",
            "exclude_ids",
            "not_launched",
            "out_of_stock",
            "max_per_brand",
            "max_per_category",
        ]


def test_pins_land_at_their_position_if_they_pass_the_filters(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[4]
    catalog = dataset.catalog
    default = [item.item_id for item in recommend(servers.ranking, dataset, user, 10).items]
    in_stock = [i for i in catalog.item_ids[catalog.stock > 0].tolist() if i not in default]
    out_of_stock = str(catalog.item_ids[catalog.stock <= 0][0])
    pins = [
        ranking_pb2.Pin(item_id=in_stock[0], position=0),
        ranking_pb2.Pin(item_id=default[8], position=3),
        ranking_pb2.Pin(item_id=out_of_stock, position=5),
    ]
    response = recommend(servers.ranking, dataset, user, 10, rules=ranking_pb2.RuleOverrides(pins=pins))
    ids = [item.item_id for item in response.items]
    assert ids[0] == in_stock[0]
    assert ids[3] == default[8]
    assert out_of_stock not in ids
    assert len(ids) == 10
    assert len(set(ids)) == 10
    effects = {e.rule: e for e in response.rule_effects}
    assert effects["out_of_stock"].removed >= 1
    assert effects["pins"].moved > 0
    with pytest.raises(grpc.RpcError) as caught:
        recommend(
            servers.ranking,
            dataset,
            user,
            10,
            rules=ranking_pb2.RuleOverrides(pins=[ranking_pb2.Pin(item_id="no-such-item", position=0)]),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rules.pins[0].item_id" in str(caught.value.details())


def test_boosts_move_items(servers: Servers, dataset: Dataset) -> None:
    user = users_by_activity(dataset)[6]
    default = recommend(servers.ranking, dataset, user, 30).items
    target = default[20]
    boost = ranking_pb2.Boost(item_id=target.item_id, multiplier=1e6)
    response = recommend(servers.ranking, dataset, user, 10, rules=ranking_pb2.RuleOverrides(boosts=[boost]))
    assert response.items[0].item_id == target.item_id
    assert {e.rule: e for e in response.rule_effects}["boosts"].moved >= 1
    # Lowering a brand sends it out of the top of the list.
    brand = default[0].brand
    lowered = recommend(
        servers.ranking,
        dataset,
        user,
        10,
        rules=ranking_pb2.RuleOverrides(boosts=[ranking_pb2.Boost(brand=brand, multiplier=1e-6)]),
    )
    assert lowered.items[0].brand != brand


def test_house_brand_surface_and_seen_exclusion(artifacts: BuiltArtifacts, servers: Servers, dataset: Dataset) -> None:
    house = _brands_in_answers(servers, dataset, users_by_activity(dataset)[:10], 10)[:3]
    surfaces = {"house": {"allowed_brands": house}, "fresh": {"exclude_seen_types": ["view", "cart", "purchase"]}}
    catalog = dataset.catalog
    with ranking_server(artifacts, servers, surfaces=surfaces) as stub:
        for user in users_by_activity(dataset)[:10]:
            response = recommend(stub, dataset, user, 10, surface="house")
            assert len(response.items) == 10
            assert {item.brand for item in response.items} <= set(house)
            assert {e.rule: e for e in response.rule_effects}["allowed_brands"].removed > 0
            # Unknown surfaces get the default rules.
            default = recommend(stub, dataset, user, 10, surface="no-such-surface")
            assert "allowed_brands" not in [e.rule for e in default.rule_effects]
        # Everything the user touched goes with "fresh"; the count reported covers what left.
        user = users_by_activity(dataset)[0]
        user_row = int(np.flatnonzero(dataset.users.user_ids == user)[0])
        touched = set(catalog.item_ids[dataset.events.item_index[dataset.events.user_index == user_row]].tolist())
        default_ids = [item.item_id for item in recommend(stub, dataset, user, 50).items]
        fresh = recommend(stub, dataset, user, 50, surface="fresh")
        assert not touched & {item.item_id for item in fresh.items}
        assert {e.rule: e for e in fresh.rule_effects}["exclude_seen"].removed >= len(touched & set(default_ids)) > 0


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (ranking_pb2.RuleOverrides(mmr_lambda=1.5), "rules.mmr_lambda"),
        (ranking_pb2.RuleOverrides(boosts=[ranking_pb2.Boost(brand="x", multiplier=0)]), "rules.boosts[0].multiplier"),
        (ranking_pb2.RuleOverrides(max_per_brand=-2), "rules.max_per_brand"),
        (
            ranking_pb2.RuleOverrides(exclude_seen_types=[ranking_pb2.EVENT_TYPE_UNSPECIFIED]),
            "rules.exclude_seen_types",
        ),
    ],
)
def test_bad_overrides_are_invalid_argument(
    servers: Servers, dataset: Dataset, rules: ranking_pb2.RuleOverrides, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        recommend(servers.ranking, dataset, "u1", 5, rules=rules)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith(field)


INT32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def _overrides(draw: st.DrawFn, items: list[str], brands: list[str]) -> ranking_pb2.RuleOverrides:
    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

    floats = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True, width=32))
    rules = ranking_pb2.RuleOverrides(
        exclude_seen_types=cast(
            "list[ranking_pb2.EventType.ValueType]", draw(st.lists(st.one_of(st.integers(0, 4), INT32), max_size=3))
        ),
        exclude_seen_window_days=maybe(st.one_of(st.integers(0, 400), INT32)),
        exclude_out_of_stock=maybe(st.booleans()),
        mmr_lambda=maybe(floats),
        max_per_brand=maybe(st.one_of(st.integers(0, 5), INT32)),
        max_per_category=maybe(st.one_of(st.integers(0, 5), INT32)),
        allowed_brands=draw(st.lists(st.one_of(st.sampled_from(brands), st.text(max_size=5)), max_size=3)),
        pins=[
            ranking_pb2.Pin(item_id=item, position=position)
            for item, position in draw(
                st.lists(st.tuples(st.sampled_from(items), st.one_of(st.integers(0, 12), INT32)), max_size=3)
            )
        ],
    )
    for target, value, multiplier in draw(
        st.lists(
            st.tuples(
                st.sampled_from(["item_id", "brand", "category", ""]),
                st.one_of(st.sampled_from(items), st.sampled_from(brands)),
                st.one_of(st.floats(0.01, 100), st.floats(allow_nan=True, allow_infinity=True, width=32)),
            ),
            max_size=3,
        )
    ):
        boost = rules.boosts.add(multiplier=multiplier)
        if target:
            setattr(boost, target, value)
    return rules


def test_rule_overrides_never_fail_on_the_server_side(servers: Servers, dataset: Dataset) -> None:
    """Any RuleOverrides: INVALID_ARGUMENT, or an answer that keeps every rule it was given."""
    users = users_by_activity(dataset)[:30]
    items = dataset.catalog.item_ids[::40].tolist()
    brands = sorted(set(dataset.catalog.brands.tolist()))[:10]

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(users), _overrides(items, brands), st.booleans(), st.sampled_from(["", "home", "\x00"]))
    def check(user: str, rules: ranking_pb2.RuleOverrides, explain: bool, surface: str) -> None:
        rejected: grpc.RpcError | None = None
        try:
            response = recommend(servers.ranking, dataset, user, 10, rules=rules, explain=explain, surface=surface)
        except grpc.RpcError as error:
            rejected = error
        if rejected is not None:
            assert rejected.code() == grpc.StatusCode.INVALID_ARGUMENT, rejected
            assert str(rejected.details()).startswith("rules."), rejected.details()
            return
        assert 0 <= rules.mmr_lambda <= 1 or not rules.HasField("mmr_lambda")
        assert all(boost.multiplier > 0 and math.isfinite(boost.multiplier) for boost in rules.boosts)
        ids = [item.item_id for item in response.items]
        assert len(ids) <= 10
        assert len(set(ids)) == len(ids)
        assert all(math.isfinite(item.score) for item in response.items)
        pinned = {pin.item_id for pin in rules.pins}
        free = [item for item in response.items if item.item_id not in pinned]
        if rules.allowed_brands:
            assert {item.brand for item in free} <= set(rules.allowed_brands)
        if rules.HasField("max_per_brand") and rules.max_per_brand > 0:
            assert max(collections.Counter(i.brand for i in free).values(), default=0) <= rules.max_per_brand
        assert all(item.HasField("explanation") == explain for item in response.items)

    check()
