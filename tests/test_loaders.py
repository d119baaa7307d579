"""Loaders of public formats: mapping, drop reports and errors, on fixtures written here.

The last two tests read the real MovieLens 100K and Amazon gift-card files from the
shared data directory (never copied into the repository: their licences forbid it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.cli import main
from shared.commands import vitrine_command
from shared.data import EVENT_CODE, Dataset, DatasetError, load_dataset
from shared.loaders import (
    EARLY_EVENT_REASON,
    CsvColumns,
    add_dataset_arguments,
    load_amazon_reviews,
    load_csv_pair,
    load_from_arguments,
    load_movielens_100k,
    parse_price,
)

SHARED_DATA = Path("/work/shared/data")
DAY0 = 883_612_800  # 1998-01-01 00:00:00 UTC
DAY = 86_400


def _write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _event(dataset: Dataset, user: str, item: str) -> tuple[str, int, str]:
    """(event type, timestamp, session) of the one event of (user, item)."""
    events = dataset.events
    mask = (dataset.users.user_ids[events.user_index] == user) & (dataset.catalog.item_ids[events.item_index] == item)
    assert mask.sum() == 1, f"expected one event of ({user}, {item}), got {mask.sum()}"
    row = int(np.flatnonzero(mask)[0])
    type_name = next(name for name, code in EVENT_CODE.items() if code == events.event_code[row])
    return type_name, int(events.timestamp[row]), str(events.session_id[row])


def _item(dataset: Dataset, item_id: str) -> dict[str, object]:
    catalog = dataset.catalog
    row = catalog.index_of()[item_id]
    return {
        "title": str(catalog.titles[row]),
        "description": str(catalog.descriptions[row]),
        "brand": str(catalog.brands[row]),
        "category": str(catalog.categories[row]),
        "price": float(catalog.prices[row]),
        "created_at": int(catalog.created_at[row]),
    }


# --- MovieLens 100K ----------------------------------------------------------------------------


@pytest.fixture
def movielens(tmp_path: Path) -> Path:
    directory = tmp_path / "ml-100k"
    directory.mkdir()
    _write(directory / "u.genre", ["unknown|0", "Action|1", "Comedy|2", "Drama|3", "War|4", ""])
    _write(directory / "u.occupation", ["technician", "other", "student"])
    _write(
        directory / "u.item",
        [
            "1|Toy Story (1995)|01-Jan-1995||http://example.org/1|0|0|1|0|0",
            "2|Misérables, Les (1995)|15-Dec-1995||http://example.org/2|0|1|0|1|1",
            "3|unknown||||1|0|0|0|0",
            "4|Never Rated (1990)|sometime||http://example.org/4|0|0|0|1|0",
        ],
        encoding="latin-1",
    )
    _write(
        directory / "u.user",
        ["1|24|M|technician|85711", "2|53|F|other|94043", "3|16|M|student|T8H1N", "4|30|F|astronaut|10001"],
    )
    _write(
        directory / "u.data",
        [
            f"1\t1\t5\t{DAY0}",
            f"1\t2\t3\t{DAY0 + 60}",
            f"1\t1\t4\t{DAY0 + 100}",  # the same pair again, later: kept, the first one dropped
            f"2\t2\t2\t{DAY0 + DAY}",
            f"2\t3\t1\t{DAY0 + 2 * DAY}",
            f"3\t1\t4\t{DAY0 + 3 * DAY}",
            f"9\t1\t5\t{DAY0}",  # unknown user
            f"1\t99\t5\t{DAY0}",  # unknown item
            f"2\t1\tfive\t{DAY0}",
            "2\t1\t5\tyesterday",
        ],
    )
    return directory


def test_movielens_ratings_become_events_and_sessions(movielens: Path) -> None:
    dataset = load_movielens_100k(movielens).dataset
    assert dataset.counts() == {"items": 4, "users": 3, "events": 5}
    assert _event(dataset, "1", "1") == ("purchase", DAY0 + 100, "1-1998-01-01")
    assert _event(dataset, "1", "2") == ("cart", DAY0 + 60, "1-1998-01-01")
    assert _event(dataset, "2", "2") == ("view", DAY0 + DAY, "2-1998-01-02")
    assert _event(dataset, "2", "3")[2] == "2-1998-01-03"
    assert np.all(np.diff(dataset.events.timestamp) >= 0)
    assert set(dataset.events.device.tolist()) == {"web"}


def test_movielens_items_carry_genres_year_and_latin1_titles(movielens: Path) -> None:
    dataset = load_movielens_100k(movielens).dataset
    toy_story = _item(dataset, "1")
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["description"] == "Genres: Comedy. Released 1995."
    assert toy_story["created_at"] == int(dt.datetime(1995, 1, 1, tzinfo=dt.UTC).timestamp())
    assert toy_story["brand"] == ""
    assert toy_story["price"] == 1.0
    miserables = _item(dataset, "2")
    assert miserables["title"] == "Misérables, Les (1995)"
    assert miserables["category"] == "Action|Drama|War"
    assert miserables["description"] == "Genres: Action, Drama, War. Released 1995."
    unknown = _item(dataset, "3")
    assert unknown["category"] == "unknown"
    assert unknown["created_at"] == DAY0 + 2 * DAY  # no release date: its first rating
    assert _item(dataset, "4")["created_at"] == DAY0 + 60  # no date, no rating: the first kept event
    text = dataset.catalog.embedding_texts()[dataset.catalog.index_of()["2"]]
    assert "Drama" in text
    assert "1995" in text


def test_an_item_exists_by_its_first_rating_whatever_its_release_date(movielens: Path) -> None:
    """A film rated before its release date (a preview) was in the catalogue by then: time
    splits must not treat it as created later (Dataset.existing_at)."""
    with (movielens / "u.item").open("a", encoding="latin-1") as items:
        items.write("5|Preview (1998)|01-Jun-1998||http://example.org/5|0|0|0|1|0\n")
    with (movielens / "u.data").open("a") as ratings:
        ratings.write(f"3\t5\t4\t{DAY0 + DAY}\n")
    loaded = load_movielens_100k(movielens)
    assert _item(loaded.dataset, "5")["created_at"] == DAY0 + DAY
    assert _item(loaded.dataset, "1")["created_at"] == int(dt.datetime(1995, 1, 1, tzinfo=dt.UTC).timestamp())
    assert loaded.report.dropped[EARLY_EVENT_REASON] == 1
    assert loaded.report.first_seen[EARLY_EVENT_REASON] == "u.item line 5"


def test_movielens_user_profiles(movielens: Path) -> None:
    users = load_movielens_100k(movielens).dataset.users
    assert users.user_ids.tolist() == ["1", "2", "3"]
    assert users.profile["age_band"].tolist() == ["18-24", "45-54", "under-18"]
    assert users.profile["gender"].tolist() == ["M", "F", "M"]
    assert users.profile["occupation"].tolist() == ["technician", "other", "student"]
    assert users.profile["zip_prefix"].tolist() == ["8", "9", "T"]
    assert users.created_at.tolist() == [DAY0 + 60, DAY0 + DAY, DAY0 + 3 * DAY]


def test_movielens_report_counts_every_reason(movielens: Path) -> None:
    report = load_movielens_100k(movielens).report
    assert report.dropped == {
        "occupation not in u.occupation (kept)": 1,
        "unparseable release date (ignored)": 1,
        "unparseable rating": 1,
        "unparseable timestamp": 1,
        "unknown user": 1,
        "unknown item": 1,
        "duplicate rating (latest kept)": 1,
        "user without ratings": 1,
        "missing price (set to 1.0)": 4,
        "missing release date (first rating time used)": 2,
    }
    assert report.first_seen["unknown item"] == "u.data line 8"
    assert report.first_seen["duplicate rating (latest kept)"] == "u.data line 1"
    assert report.rows_read[str(movielens / "u.data")] == 10
    summary = report.summary()
    assert "movielens-100k: 4 items, 3 users, 5 events" in summary
    assert "1  unknown item (first: u.data line 8)" in summary


def test_movielens_thresholds_are_parameters(movielens: Path) -> None:
    dataset = load_movielens_100k(movielens, purchase_rating=5, cart_rating=4).dataset
    assert _event(dataset, "1", "1")[0] == "cart"  # the kept rating is a 4
    assert _event(dataset, "3", "1")[0] == "cart"
    with pytest.raises(DatasetError, match="must not exceed"):
        load_movielens_100k(movielens, purchase_rating=3, cart_rating=4)


def test_movielens_malformed_lines_name_file_and_line(movielens: Path) -> None:
    data = movielens / "u.data"
    data.write_text(data.read_text() + "5\t1\t4\n")
    with pytest.raises(DatasetError, match=r"u\.data line 11: expected 4 tab-separated fields, got 3"):
        load_movielens_100k(movielens)
    data.write_text(f"1\t1\t5\t{DAY0}\n")
    item = movielens / "u.item"
    item.write_bytes(item.read_bytes() + b"5|Broken (1990)|01-Jan-1990||url|0|0|2|0|0\n")
    with pytest.raises(DatasetError, match=r"u\.item line 5: flag of genre 'Comedy' is '2', expected 0 or 1"):
        load_movielens_100k(movielens)
    (movielens / "u.user").unlink()
    with pytest.raises(DatasetError, match=r"u\.user: file not found \(expected the MovieLens 100K user file"):
        load_movielens_100k(movielens)


# --- Amazon reviews ----------------------------------------------------------------------------


def _jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    return _write(path, [json.dumps(record) for record in records])


def _review(user: str, asin: str, overall: object, time: int) -> dict[str, object]:
    return {"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": time, "reviewText": "ok"}


def _meta(asin: str, title: str, price: str, **fields: object) -> dict[str, object]:
    return {"asin": asin, "title": title, "price": price, "description": [], "category": [], "brand": "", **fields}


REVIEWS = [
    _review("A1", "B1", 5.0, DAY0),
    _review("A1", "B1", 4.0, DAY0 + 10),
    _review("A2", "B2", 3.0, DAY0 + DAY),
    _review("A2", "B3", 1.0, DAY0 + DAY + 5),
    _review("A3", "BX", 5.0, DAY0),
    _review("A3", "B1", "five", DAY0),
    _review("A3", "B5", 2.0, DAY0 + 2 * DAY),
]
META = [
    _meta(
        "B1",
        "Card &amp; Co",
        "$25.00",
        description=["<p>Nice <b>card</b></p>", "Second."],
        brand="Acme",
        category=["Gift Cards", "Gift Cards", "Restaurants"],
    ),
    _meta("B2", "Range card", "$10.00 - $20.00"),
    _meta("B3", "No price card", ""),
    _meta("B4", "Never reviewed", "$5.00"),
    _meta("B1", "A second B1 row", "$99.00"),
    _meta("B5", "Junk price", ".a-box-inner{background-color:#fff}"),
]


@pytest.fixture
def amazon(tmp_path: Path) -> Path:
    directory = tmp_path / "amazon"
    directory.mkdir()
    _jsonl(directory / "Gift_Cards_5.json", REVIEWS)
    _jsonl(directory / "meta_Gift_Cards.json", META)
    return directory


def test_amazon_mapping(amazon: Path) -> None:
    dataset = load_amazon_reviews(amazon).dataset
    assert dataset.name == "amazon-reviews:Gift_Cards"
    assert dataset.counts() == {"items": 4, "users": 3, "events": 4}
    assert _event(dataset, "A1", "B1")[:2] == ("purchase", DAY0 + 10)
    assert _event(dataset, "A2", "B2")[0] == "cart"
    assert _event(dataset, "A2", "B3")[0] == "view"
    assert _item(dataset, "B1") == {
        "title": "Card & Co",
        "description": "Nice card Second.",
        "brand": "Acme",
        "category": "Gift Cards > Restaurants",
        "price": 25.0,
        "created_at": DAY0 + 10,
    }
    assert _item(dataset, "B2")["price"] == 10.0
    assert _item(dataset, "B3")["price"] == 1.0
    assert _item(dataset, "B3")["category"] == "unknown"
    assert dataset.users.created_at[dataset.users.index_of()["A2"]] == DAY0 + DAY
    assert dataset.users.profile == {}


def test_amazon_report(amazon: Path) -> None:
    report = load_amazon_reviews(amazon).report
    assert report.dropped == {
        "duplicate metadata row (first kept)": 1,
        "unparseable rating": 1,
        "review of an item without metadata": 1,
        "duplicate review (latest kept)": 1,
        "metadata row of an item without reviews": 1,
        "HTML tags stripped from title/brand/description": 1,
        "missing price (set to 1.0)": 1,
        "unparseable price (set to 1.0)": 1,
    }
    assert report.first_seen["metadata row of an item without reviews"] == "meta_Gift_Cards.json line 4"
    assert report.rows_read == {str(amazon / "Gift_Cards_5.json"): 7, str(amazon / "meta_Gift_Cards.json"): 6}


def test_amazon_explicit_and_gzipped_files(amazon: Path, tmp_path: Path) -> None:
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for name in ("Gift_Cards_5.json", "meta_Gift_Cards.json"):
        (zipped / f"{name}.gz").write_bytes(gzip.compress((amazon / name).read_bytes()))
    assert load_amazon_reviews(zipped).dataset.counts() == {"items": 4, "users": 3, "events": 4}
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes((amazon / "meta_Gift_Cards.json").read_bytes())
    (amazon / "meta_Gift_Cards.json").unlink()
    with pytest.raises(DatasetError, match=r"expected exactly one metadata file matching meta_\*\.json"):
        load_amazon_reviews(amazon)
    result = load_amazon_reviews(amazon / "Gift_Cards_5.json", meta=elsewhere)
    assert result.report.paths == (str(amazon / "Gift_Cards_5.json"), str(elsewhere))


def test_amazon_bad_json_names_file_and_line(amazon: Path) -> None:
    reviews = amazon / "Gift_Cards_5.json"
    reviews.write_text(reviews.read_text() + '{"reviewerID": "A9", "asin": \n')
    with pytest.raises(DatasetError, match=r"Gift_Cards_5\.json line 8: not valid JSON"):
        load_amazon_reviews(amazon)
    reviews.write_text("[1, 2]\n")
    with pytest.raises(DatasetError, match=r"Gift_Cards_5\.json line 1: expected a JSON object, got list"):
        load_amazon_reviews(amazon)


@pytest.mark.parametrize(
    ("text", "price"),
    [("$25.00", 25.0), ("$10.00 - $20.00", 10.0), ("$1,299.99", 1299.99), ("12", 12.0), ("", None), ("$0.00", None)],
)
def test_parse_price(text: str, price: float | None) -> None:
    assert parse_price(text) == price


# --- generic csv / Parquet ---------------------------------------------------------------------

CSV_COLUMNS = CsvColumns(
    user="user",
    item="item",
    rating="stars",
    timestamp="when",
    item_id="sku",
    text=("name", "blurb"),
    brand="maker",
    category="kind",
    price="cost",
)


@pytest.fixture
def csv_pair(tmp_path: Path) -> tuple[Path, Path]:
    interactions = _write(
        tmp_path / "interactions.csv",
        [
            "user,item,stars,when",
            "u1,i1,5,2024-01-01T10:00:00",
            "u1,i2,2,1704103200",
            "u2,i1,3,2024-01-02",
            "u2,i9,5,2024-01-02",
            "u3,i2,4,yesterday",
            ",i1,4,2024-01-03",
            "u1,i1,4,2024-01-01T09:00:00",
        ],
    )
    items = _write(
        tmp_path / "items.csv",
        [
            "sku,name,blurb,maker,kind,cost",
            'i1,Red mug,"Ceramic, 300 ml",Acme,Kitchen,$12.50',
            "i2,Blue cup,,Acme,Kitchen,",
            "i3,Green bowl,Bowl,Other,,7",
            "i1,Red mug again,,Acme,Kitchen,1",
        ],
    )
    return interactions, items


def test_csv_pair_mapping_and_report(csv_pair: tuple[Path, Path]) -> None:
    result = load_csv_pair(*csv_pair, CSV_COLUMNS)
    dataset = result.dataset
    assert dataset.counts() == {"items": 3, "users": 2, "events": 3}
    stamp = int(dt.datetime(2024, 1, 1, 10, tzinfo=dt.UTC).timestamp())
    assert _event(dataset, "u1", "i1") == ("purchase", stamp, "u1-2024-01-01")  # the 09:00 repeat is older
    assert _event(dataset, "u1", "i2") == ("view", 1704103200, "u1-2024-01-01")
    assert _event(dataset, "u2", "i1")[0] == "cart"
    assert _item(dataset, "i1") == {
        "title": "Red mug",
        "description": "Ceramic, 300 ml",
        "brand": "Acme",
        "category": "Kitchen",
        "price": 12.5,
        "created_at": stamp,
    }
    assert _item(dataset, "i3")["category"] == "unknown"
    assert _item(dataset, "i3")["price"] == 7.0
    assert result.report.dropped == {
        "duplicate item row (first kept)": 1,
        "unparseable timestamp": 1,
        "missing user or item id": 1,
        "interaction with an item not in the items file": 1,
        "duplicate rating (latest kept)": 1,
        "missing price (set to 1.0)": 1,
    }
    assert result.report.first_seen["unparseable timestamp"] == "interactions.csv line 6"
    assert any("1 items have no interactions" in note for note in result.report.notes)


def test_parquet_event_log(tmp_path: Path) -> None:
    when = [dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC) + dt.timedelta(minutes=m) for m in range(6)]
    pq.write_table(
        pa.table(
            {
                "visitor": pa.array([7, 7, 7, 7, 8, 8], pa.int64()),
                "itemid": pa.array([100, 100, 100, 101, 101, 100], pa.int64()),
                "event": ["view", "addtocart", "addtocart", "transaction", "teleport", "VIEW"],
                "ts": pa.array([when[0], when[1], when[1], when[3], when[4], when[5]], pa.timestamp("s", tz="UTC")),
            }
        ),
        tmp_path / "events.parquet",
    )
    pq.write_table(
        pa.table({"itemid": pa.array([100, 101], pa.int64()), "title": ["Lamp", "Desk"], "price": [19.9, None]}),
        tmp_path / "items.parquet",
    )
    columns = CsvColumns(user="visitor", item="itemid", event="event", timestamp="ts", price="price")
    result = load_csv_pair(tmp_path / "events.parquet", tmp_path / "items.parquet", columns)
    dataset = result.dataset
    types = [next(n for n, c in EVENT_CODE.items() if c == code) for code in dataset.events.event_code.tolist()]
    # An event log keeps a view and a cart of the same pair; only the exact repeat goes.
    assert types == ["view", "cart", "purchase", "view"]
    assert dataset.events.timestamp[0] == int(when[0].timestamp())
    assert dataset.catalog.item_ids.tolist() == ["100", "101"]
    assert dataset.catalog.prices.tolist() == [19.9, 1.0]
    assert result.report.dropped == {
        "unknown event type (not view, cart, purchase, wishlist or an alias)": 1,
        "duplicate event (exact repeat)": 1,
        "missing price (set to 1.0)": 1,
    }
    assert result.report.first_seen["duplicate event (exact repeat)"] == "events.parquet row 2"


def test_csv_without_time_or_rating(tmp_path: Path) -> None:
    interactions = _write(tmp_path / "clicks.tsv", ["user_id\titem_id", "a\tx", "b\ty", "a\ty"])
    items = _write(tmp_path / "items.tsv", ["item_id\ttitle", "x\tPen", "y\tInk"])
    result = load_csv_pair(interactions, items)
    events = result.dataset.events
    assert events.timestamp.tolist() == [0, 1, 2]
    assert set(events.event_code.tolist()) == {EVENT_CODE["purchase"]}
    assert any("synthetic timestamps" in note for note in result.report.notes)
    assert result.report.dropped == {"missing price (set to 1.0)": 2}


def test_csv_malformed_files(csv_pair: tuple[Path, Path], tmp_path: Path) -> None:
    interactions, items = csv_pair
    with interactions.open("a") as handle:
        handle.write("u9,i1,4\n")
    with pytest.raises(DatasetError, match=r"interactions\.csv line 9: expected 4 ','-separated fields"):
        load_csv_pair(interactions, items, CSV_COLUMNS)
    with pytest.raises(DatasetError, match=r"no column 'rating' \(rating\); the file has columns user, item"):
        load_csv_pair(interactions, items, dataclasses.replace(CSV_COLUMNS, rating="rating"))
    other = tmp_path / "interactions.xlsx"
    other.write_text("")
    with pytest.raises(DatasetError, match=r"unknown file type '\.xlsx'"):
        load_csv_pair(other, items, CSV_COLUMNS)
    with pytest.raises(DatasetError, match=r"missing\.csv: file not found"):
        load_csv_pair(tmp_path / "missing.csv", items, CSV_COLUMNS)
    interactions.write_text("user,item,stars,when\nu1,i9,5,1\n")
    with pytest.raises(
        DatasetError, match=r"interactions\.csv: no ratings left \(dropped: .*1 interaction with an item"
    ):
        load_csv_pair(interactions, items, CSV_COLUMNS)


# --- command line ------------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def test_arguments_select_the_loader(csv_pair: tuple[Path, Path]) -> None:
    interactions, items = csv_pair
    args = _parse(
        "--dataset",
        f"csv:{interactions}",
        "--csv-items",
        str(items),
        "--csv-user-col",
        "user",
        "--csv-item-col",
        "item",
        "--csv-rating-col",
        "stars",
        "--csv-timestamp-col",
        "when",
        "--csv-item-id-col",
        "sku",
        "--csv-text-cols",
        "name, blurb",
        "--csv-brand-col",
        "maker",
        "--csv-category-col",
        "kind",
        "--csv-price-col",
        "cost",
    )
    assert load_from_arguments(args).dataset.counts() == load_csv_pair(*csv_pair, CSV_COLUMNS).dataset.counts()
    with pytest.raises(DatasetError, match="needs --csv-items"):
        load_from_arguments(_parse("--dataset", f"csv:{interactions}"))


def test_unknown_format_lists_the_valid_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown format 'movielens-1m'; expected one of movielens-100k, amazon"):
        load_from_arguments(_parse("--dataset", "movielens-1m:/data"))
    with pytest.raises(DatasetError, match="expected FORMAT:PATH"):
        load_from_arguments(_parse("--dataset", "/data/ml-100k"))
    assert main(["load", "--dataset", "parquet:/data", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vitrine: --dataset 'parquet:/data': unknown format 'parquet'")
    assert "\n" not in error
    assert not (tmp_path / "out").exists()


def test_load_help_documents_the_csv_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["load", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--dataset FORMAT:PATH", "--csv-items", "--csv-text-cols", "--csv-price-col", "--amazon-meta"):
        assert option in help_text


def test_vitrine_load_writes_a_dataset_directory(movielens: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    completed = subprocess.run(
        vitrine_command("load", "--dataset", f"movielens-100k:{movielens}", "--out", str(out)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "movielens-100k: 4 items, 3 users, 5 events" in completed.stdout
    assert "duplicate rating (latest kept) (first: u.data line 1)" in completed.stdout
    dataset = load_dataset(out)
    assert dataset.counts() == {"items": 4, "users": 3, "events": 5}
    assert dataset.users.profile["age_band"].tolist() == ["18-24", "45-54", "under-18"]
    assert dataset.catalog.titles[dataset.catalog.index_of()["2"]] == "Misérables, Les (1995)"
    assert dataset.source["format"] == "movielens-100k"
    assert dataset.source["dropped"]["unknown user"] == 1


# --- the real data -----------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k").is_dir(), reason="MovieLens 100K is not in /work/shared/data")
def test_real_movielens_100k() -> None:
    directory = SHARED_DATA / "ml-100k"
    result = load_movielens_100k(directory)
    assert result.report.rows_read[str(directory / "u.data")] == 100_000
    assert result.report.rows_read[str(directory / "u.item")] == 1682
    assert result.report.rows_read[str(directory / "u.user")] == 943
    assert result.dataset.counts() == {"items": 1682, "users": 943, "events": 100_000}
    assert result.report.dropped == {
        "missing price (set to 1.0)": 1682,
        "missing release date (first rating time used)": 1,  # item 267, "unknown"
        EARLY_EVENT_REASON: 24,  # rated before the release date u.item gives
    }
    events = result.dataset.events
    assert int(events.timestamp.min()) == 874724710
    assert int(events.timestamp.max()) == 893286638
    # Rating counts of u.data: 1+2 stars 17,480 views, 3 stars 27,145 carts, 4+5 stars 55,375 purchases.
    assert np.bincount(events.event_code).tolist() == [17_480, 27_145, 55_375]


@pytest.mark.skipif(
    not (SHARED_DATA / "amazon-gift-cards-2018").is_dir(), reason="Amazon gift cards are not in /work/shared/data"
)
def test_real_amazon_gift_cards() -> None:
    directory = SHARED_DATA / "amazon-gift-cards-2018"
    result = load_amazon_reviews(directory)
    # Per its README: 2,972 reviews (2,965 distinct user-item pairs) by 458 users of 148 items; 1,547 meta rows.
    assert result.report.rows_read == {
        str(directory / "Gift_Cards_5.json"): 2972,
        str(directory / "meta_Gift_Cards.json"): 1547,
    }
    assert result.dataset.counts() == {"items": 148, "users": 458, "events": 2965}
    assert result.report.dropped == {
        "duplicate review (latest kept)": 7,
        "metadata row of an item without reviews": 1547 - 148,
        "missing price (set to 1.0)": 148 - 107,  # README: 107 of the 148 have a price
    }
    # Ratings per README: 4-5 stars 2,906, 3 stars 33, 1-2 stars 33; the 7 duplicates are six 5s and one 3.
    assert np.bincount(result.dataset.events.event_code).tolist() == [33, 32, 2900]
