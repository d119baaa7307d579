"""Dataset loading: schema checks with errors that name the file and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def _set_cell(path: Path, column: str, row: int, value: str) -> None:
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values)), path)


def test_unknown_event_type_names_the_row(saved: Path) -> None:
    _set_cell(saved / "events.parquet", "event_type", 3, "teleport")
    with pytest.raises(DatasetError, match=r"row 3: event_type 'teleport' is not one of view, cart, purchase"):
        load_dataset(saved)


def test_event_for_unknown_item_is_refused(saved: Path) -> None:
    _set_cell(saved / "events.parquet", "item_id", 0, "SKU-ghost")
    with pytest.raises(DatasetError, match="SKU-ghost"):
        load_dataset(saved)


def test_missing_column_is_named(saved: Path) -> None:
    table = pq.read_table(saved / "items.parquet").drop_columns(["price"])
    pq.write_table(table, saved / "items.parquet")
    with pytest.raises(DatasetError, match=r"items.parquet: missing column\(s\) price"):
        load_dataset(saved)


def test_duplicate_item_ids_are_refused(saved: Path, dataset: Dataset) -> None:
    _set_cell(saved / "items.parquet", "item_id", 1, str(dataset.catalog.item_ids[0]))
    with pytest.raises(DatasetError, match="must be unique"):
        load_dataset(saved)


def test_select_items_keeps_their_events_on_the_right_rows(dataset: Dataset) -> None:
    keep = np.zeros(len(dataset.catalog), dtype=bool)
    keep[::3] = True
    kept = dataset.select_items(keep)
    assert kept.catalog.item_ids.tolist() == dataset.catalog.item_ids[keep].tolist()
    assert kept.catalog.created_at.tolist() == dataset.catalog.created_at[keep].tolist()
    on_kept = keep[dataset.events.item_index]
    assert len(kept.events) == int(on_kept.sum())
    assert (
        kept.catalog.item_ids[kept.events.item_index].tolist()
        == dataset.catalog.item_ids[dataset.events.item_index[on_kept]].tolist()
    )
    assert kept.events.timestamp.tolist() == dataset.events.timestamp[on_kept].tolist()
    assert kept.users is dataset.users


def test_existing_at_leaves_out_the_items_created_later(dataset: Dataset) -> None:
    moment = int(np.median(dataset.catalog.created_at))
    existing = dataset.existing_at(moment)
    assert 0 < len(existing.catalog) < len(dataset.catalog)
    assert int(existing.catalog.created_at.max()) <= moment
    later = set(dataset.catalog.item_ids[dataset.catalog.created_at > moment].tolist())
    assert not later & set(existing.catalog.item_ids.tolist())
