"""Tests of the synthetic retail dataset generator (shared/datagen.py).

Most tests share one small dataset; only ``test_default_sizes_meet_minimums``
generates the full default size.
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest

from shared.data import DEVICES, EVENT_CODE, Dataset, load_dataset
from shared.datagen import CATEGORIES, GeneratorConfig, generate, write_default_dataset

SMALL = GeneratorConfig(n_items=1500, n_users=300, n_events=20_000)
DAY = 86_400


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(SMALL)


def _assert_datasets_equal(a: Dataset, b: Dataset) -> None:
    for name in ("item_ids", "titles", "descriptions", "brands", "categories", "prices", "stock", "created_at"):
        np.testing.assert_array_equal(getattr(a.catalog, name), getattr(b.catalog, name), err_msg=f"catalog.{name}")
    np.testing.assert_array_equal(a.users.user_ids, b.users.user_ids)
    np.testing.assert_array_equal(a.users.created_at, b.users.created_at)
    assert sorted(a.users.profile) == sorted(b.users.profile)
    for name in a.users.profile:
        np.testing.assert_array_equal(a.users.profile[name], b.users.profile[name], err_msg=f"profile.{name}")
    for name in ("user_index", "item_index", "event_code", "timestamp", "device", "session_id"):
        np.testing.assert_array_equal(getattr(a.events, name), getattr(b.events, name), err_msg=f"events.{name}")


def test_default_sizes_meet_minimums() -> None:
    config = GeneratorConfig()
    dataset = generate(config)
    counts = dataset.counts()
    assert counts["items"] >= 10_000
    assert counts["users"] >= 3_000
    assert counts["events"] >= 200_000
    assert abs(counts["events"] - config.n_events) <= 0.1 * config.n_events


def test_same_seed_gives_identical_arrays(small: Dataset) -> None:
    again = generate(SMALL)
    _assert_datasets_equal(small, again)
    assert again.source == small.source


def test_different_seeds_give_different_data(small: Dataset) -> None:
    other = generate(GeneratorConfig(seed=SMALL.seed + 1, n_items=1500, n_users=300, n_events=20_000))
    assert not np.array_equal(small.catalog.titles, other.catalog.titles)
    assert not np.array_equal(small.catalog.prices, other.catalog.prices)
    assert len(small.events) != len(other.events) or not np.array_equal(
        small.events.item_index, other.events.item_index
    )


def test_event_count_close_to_target(small: Dataset) -> None:
    assert abs(len(small.events) - SMALL.n_events) <= 0.1 * SMALL.n_events


def test_source_records_generator_and_config(small: Dataset) -> None:
    assert small.name == "vitrine-synthetic"
    assert small.source["generator"] == "vitrine.datagen"
    assert small.source["seed"] == SMALL.seed
    assert small.source["config"] == asdict(SMALL)
    assert set(small.source["config"]) == {f.name for f in fields(GeneratorConfig)}


def test_catalog_schema(small: Dataset) -> None:
    catalog = small.catalog
    assert len(catalog) == SMALL.n_items
    assert len(np.unique(catalog.item_ids)) == len(catalog)
    assert all(re.fullmatch(r"SKU-\d{6}", item_id) for item_id in catalog.item_ids.tolist())
    assert np.all(catalog.prices > 0)
    np.testing.assert_allclose(catalog.prices, np.round(catalog.prices, 2))
    assert np.all(catalog.stock >= 0)
    out_of_stock = float(np.mean(catalog.stock == 0))
    assert 0.04 < out_of_stock < 0.13
    year_before = SMALL.start - 366 * DAY
    window_end = SMALL.start + SMALL.days * DAY
    assert np.all((catalog.created_at >= year_before) & (catalog.created_at < window_end))
    new_share = float(np.mean(catalog.created_at >= SMALL.start))
    assert 0.05 < new_share < 0.2, "some items should be launched during the window"


def test_catalog_categories_brands_and_prices(small: Dataset) -> None:
    catalog = small.catalog
    categories = np.unique(catalog.categories)
    assert 12 <= len(categories) <= 16
    assert set(categories.tolist()) == {spec.name for spec in CATEGORIES}
    for category in categories.tolist():
        brands = np.unique(catalog.brands[catalog.categories == category])
        assert 4 <= len(brands) <= 10, category
    # A few brands sell in several categories.
    categories_per_brand = [
        len(np.unique(catalog.categories[catalog.brands == brand])) for brand in np.unique(catalog.brands).tolist()
    ]
    assert sum(n >= 2 for n in categories_per_brand) >= 3
    # Prices follow the category: skincare is cheaper than watches.
    assert np.median(catalog.prices[catalog.categories == "skincare"]) * 3 < np.median(
        catalog.prices[catalog.categories == "watches"]
    )


def test_texts_are_short_and_category_specific(small: Dataset) -> None:
    catalog = small.catalog
    title_words = np.asarray([len(t.split()) for t in catalog.titles.tolist()])
    description_words = np.asarray([len(d.split()) for d in catalog.descriptions.tolist()])
    assert title_words.min() >= 4
    assert title_words.max() <= 9
    assert description_words.min() >= 12
    assert description_words.max() <= 25
    assert all(title.startswith(brand) for title, brand in zip(catalog.titles, catalog.brands, strict=True))

    # Items of one category share far more vocabulary than items of different categories,
    # which is what makes content embeddings meaningful.
    def words(row: int) -> set[str]:
        return set(f"{catalog.titles[row]} {catalog.descriptions[row]}".lower().replace(".", "").split())

    def jaccard(a: int, b: int) -> float:
        wa, wb = words(a), words(b)
        return len(wa & wb) / len(wa | wb)

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(catalog), (4000, 2))
    same = catalog.categories[pairs[:, 0]] == catalog.categories[pairs[:, 1]]
    scores = np.asarray([jaccard(int(a), int(b)) for a, b in pairs])
    assert scores[same].mean() > 2 * scores[~same].mean()


def test_users_schema(small: Dataset) -> None:
    users = small.users
    assert len(users) == SMALL.n_users
    assert len(np.unique(users.user_ids)) == len(users)
    assert all(re.fullmatch(r"U-\d{5}", user_id) for user_id in users.user_ids.tolist())
    assert np.all(users.created_at < SMALL.start + SMALL.days * DAY)
    assert np.any(users.created_at >= SMALL.start), "some users join during the window"
    assert set(users.profile) == {"region", "age_band"}
    assert 3 <= len(np.unique(users.profile["region"])) <= 8
    assert set(np.unique(users.profile["age_band"]).tolist()) <= {"18-24", "25-34", "35-44", "45-54", "55-64", "65+"}
    for column in users.profile.values():
        assert len(column) == len(users)


def test_events_schema(small: Dataset) -> None:
    events = small.events
    window_end = SMALL.start + SMALL.days * DAY
    # The generator writes views, carts and purchases (no wishlist adds).
    assert set(np.unique(events.event_code).tolist()) == {EVENT_CODE[name] for name in ("view", "cart", "purchase")}
    assert np.all(np.diff(events.timestamp) >= 0), "events must be sorted by timestamp"
    assert events.timestamp.min() >= SMALL.start
    assert events.timestamp.max() < window_end
    assert events.user_index.min() >= 0
    assert events.user_index.max() < len(small.users)
    assert events.item_index.min() >= 0
    assert events.item_index.max() < len(small.catalog)
    assert set(np.unique(events.device).tolist()) == set(DEVICES)
    assert all(re.fullmatch(r"S-\d{7}", s) for s in np.unique(events.session_id).tolist())
    # Nobody interacts with an item before it exists or before they signed up.
    assert np.all(small.catalog.created_at[events.item_index] <= events.timestamp)
    assert np.all(small.users.created_at[events.user_index] <= events.timestamp)


def test_sessions_are_one_user_one_device_short(small: Dataset) -> None:
    events = small.events
    sessions, session = np.unique(events.session_id, return_inverse=True)
    for column in (events.user_index, events.device):
        _, value = np.unique(column, return_inverse=True)
        per_session = np.zeros(len(sessions), dtype=np.int64)
        np.maximum.at(per_session, session, value)
        lowest = np.full(len(sessions), np.iinfo(np.int64).max)
        np.minimum.at(lowest, session, value)
        assert np.array_equal(per_session, lowest), "a session has a single user and a single device"
    sizes = np.bincount(session)
    assert 3 <= sizes.mean() <= 10
    assert sizes.max() <= 30
    spans = np.zeros(len(sessions), dtype=np.int64)
    first = np.full(len(sessions), np.iinfo(np.int64).max)
    np.maximum.at(spans, session, events.timestamp)
    np.minimum.at(first, session, events.timestamp)
    assert np.all(spans - first <= 3 * 3600), "a session lasts minutes, not days"


def test_event_mix_is_a_retail_funnel(small: Dataset) -> None:
    share = np.bincount(small.events.event_code, minlength=3) / len(small.events)
    assert 0.75 <= share[EVENT_CODE["view"]] <= 0.85
    assert 0.10 <= share[EVENT_CODE["cart"]] <= 0.16
    assert 0.04 <= share[EVENT_CODE["purchase"]] <= 0.08


def test_every_purchase_and_cart_follows_a_view_in_the_same_session(small: Dataset) -> None:
    events = small.events
    code = events.event_code
    first_view: dict[tuple[int, int, str], int] = {}
    for row in np.flatnonzero(code == EVENT_CODE["view"]).tolist():
        key = (int(events.user_index[row]), int(events.item_index[row]), str(events.session_id[row]))
        first_view.setdefault(key, int(events.timestamp[row]))
    carts: set[tuple[int, int, str]] = set()
    for name in ("cart", "purchase"):
        rows = np.flatnonzero(code == EVENT_CODE[name]).tolist()
        assert rows
        for row in rows:
            key = (int(events.user_index[row]), int(events.item_index[row]), str(events.session_id[row]))
            assert key in first_view, f"{name} at row {row} has no view of the item in its session"
            assert first_view[key] < int(events.timestamp[row])
            if name == "cart":
                carts.add(key)
    purchase_rows = np.flatnonzero(code == EVENT_CODE["purchase"]).tolist()
    with_cart = [
        (int(events.user_index[r]), int(events.item_index[r]), str(events.session_id[r])) in carts
        for r in purchase_rows
    ]
    assert np.mean(with_cart) > 0.8, "purchases usually go through the cart"


def test_out_of_stock_items_are_viewed_but_never_bought(small: Dataset) -> None:
    events = small.events
    out_of_stock = small.catalog.stock[events.item_index] == 0
    assert np.any(out_of_stock & (events.event_code == EVENT_CODE["view"]))
    assert not np.any(out_of_stock & (events.event_code != EVENT_CODE["view"]))


def test_repeat_purchases_are_rare(small: Dataset) -> None:
    events = small.events
    bought = events.event_code == EVENT_CODE["purchase"]
    pairs = events.user_index[bought].astype(np.int64) * len(small.catalog) + events.item_index[bought]
    assert 1 - len(np.unique(pairs)) / len(pairs) < 0.05


def test_activity_is_heavy_tailed_and_rhythm_peaks_in_the_evening(small: Dataset) -> None:
    per_user = np.sort(np.bincount(small.events.user_index, minlength=len(small.users)))[::-1]
    top_tenth = per_user[: len(per_user) // 10].sum() / per_user.sum()
    assert top_tenth > 0.3
    hour = (small.events.timestamp // 3600) % 24
    evening = np.isin(hour, [18, 19, 20, 21]).sum()
    small_hours = np.isin(hour, [2, 3, 4, 5]).sum()
    assert evening > 4 * small_hours


def test_roundtrip_through_save_and_load(small: Dataset, tmp_path: Path) -> None:
    from shared.data import save_dataset

    save_dataset(small, tmp_path / "ds")
    loaded = load_dataset(tmp_path / "ds")
    _assert_datasets_equal(small, loaded)
    assert loaded.name == small.name
    assert loaded.source == small.source


def test_write_default_dataset_writes_a_loadable_directory(tmp_path: Path) -> None:
    config = GeneratorConfig(seed=3, n_items=300, n_users=50, n_events=2_000)
    written = write_default_dataset(tmp_path / "out", config)
    assert (tmp_path / "out" / "dataset.json").is_file()
    loaded = load_dataset(tmp_path / "out")
    _assert_datasets_equal(written, loaded)
    assert loaded.counts() == written.counts()


def _split_users(dataset: Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """(first-half items, second-half items) for users active enough in both halves."""
    events = dataset.events
    middle = SMALL.start + SMALL.days * DAY // 2
    order = np.argsort(events.user_index, kind="stable")
    users = events.user_index[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    result = []
    for rows in np.split(order, bounds):
        early = events.item_index[rows][events.timestamp[rows] < middle]
        late = events.item_index[rows][events.timestamp[rows] >= middle]
        if len(early) >= 10 and len(late) >= 5:
            result.append((early, late))
    return result


def test_future_interactions_follow_past_category(small: Dataset) -> None:
    _, category = np.unique(small.catalog.categories, return_inverse=True)
    base_rate = np.bincount(category[small.events.item_index]) / len(small.events)
    users = _split_users(small)
    assert len(users) >= 50
    hit, chance = [], []
    for early, late in users:
        top = int(np.bincount(category[early]).argmax())
        hit.append(np.mean(category[late] == top))
        chance.append(base_rate[top])
    assert np.mean(hit) > 0.4
    assert np.mean(hit) > 4 * np.mean(chance)


def test_future_interactions_follow_past_brand(small: Dataset) -> None:
    _, brand = np.unique(small.catalog.brands, return_inverse=True)
    base_rate = np.bincount(brand[small.events.item_index]) / len(small.events)
    hit, chance = [], []
    for early, late in _split_users(small):
        top = int(np.bincount(brand[early]).argmax())
        hit.append(np.mean(brand[late] == top))
        chance.append(base_rate[top])
    assert np.mean(hit) > 5 * np.mean(chance)


def test_purchases_favour_items_priced_like_past_purchases(small: Dataset) -> None:
    """Price fit is learnable: a user's purchases sit closer to their own typical price than to others'."""
    events = small.events
    bought = events.event_code == EVENT_CODE["purchase"]
    _, category = np.unique(small.catalog.categories, return_inverse=True)
    log_price = np.log(small.catalog.prices)
    # Price relative to the category median removes the category effect.
    medians = np.asarray([np.median(log_price[category == c]) for c in range(category.max() + 1)])
    relative = log_price - medians[category]
    user = events.user_index[bought]
    price = relative[events.item_index[bought]]
    counts = np.bincount(user, minlength=len(small.users))[user]
    totals = np.bincount(user, weights=price, minlength=len(small.users))[user]
    active = counts >= 4
    # Leave-one-out: predict each purchase's price from the user's other purchases. With no
    # price signal the squared error would exceed the overall variance.
    others_mean = (totals[active] - price[active]) / (counts[active] - 1)
    error = np.mean((price[active] - others_mean) ** 2)
    assert active.sum() >= 100
    assert error < 0.8 * np.var(price[active])


@pytest.mark.parametrize(
    "bad",
    [
        {"n_items": 10},
        {"n_users": 0},
        {"n_events": 0},
        {"days": 0},
    ],
)
def test_invalid_config_is_rejected(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(GeneratorConfig(**bad))
