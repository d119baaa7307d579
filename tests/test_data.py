"""Dataset loading: schema checks with errors that name the file and row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.data import Dataset, DatasetError, load_dataset, save_dataset


@pytest.fixture
def saved(tmp_path: Path, dataset: Dataset) -> Path:
    save_dataset(dataset, tmp_path)
    return tmp_path


def test_round_trip_keeps_counts(saved: Path, dataset: Dataset) -> None:
    assert load_dataset(saved).counts() == dataset.counts()


def test_missing_directory_descriptor(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json: file not found"):
        load_dataset(tmp_path)


def test_unknown_event_type_names_the_row(saved: Path) -> None:
    table = pq.read_table(saved / "events.parquet")
    types = table.column("event_type").to_pylist()
    types[3] = "teleport"
    table = table.set_column(table.schema.get_field_index("event_type"), "event_type", pa.array(types))
    pq.write_table(table, saved / "events.parquet")
    with pytest.raises(DatasetError, match=r"row 3: event_type 'teleport' is not one of view, cart, purchase"):
        load_dataset(saved)


def test_event_for_unknown_item_is_refused(saved: Path) -> None:
    table = pq.read_table(saved / "events.parquet")
    items = table.column("item_id").to_pylist()
    items[0] = "SKU-ghost"
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(items))
    pq.write_table(table, saved / "events.parquet")
    with pytest.raises(DatasetError, match="SKU-ghost"):
        load_dataset(saved)


def test_missing_column_is_named(saved: Path) -> None:
    table = pq.read_table(saved / "items.parquet").drop_columns(["price"])
    pq.write_table(table, saved / "items.parquet")
    with pytest.raises(DatasetError, match=r"items.parquet: missing column\(s\) price"):
        load_dataset(saved)


def test_duplicate_item_ids_are_refused(saved: Path) -> None:
    table = pq.read_table(saved / "items.parquet")
    ids = table.column("item_id").to_pylist()
    ids[1] = ids[0]
    table = table.set_column(0, "item_id", pa.array(ids))
    pq.write_table(table, saved / "items.parquet")
    with pytest.raises(DatasetError, match="must be unique"):
        load_dataset(saved)
