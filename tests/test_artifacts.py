"""Versioned artifact directories: written atomically, refused when they do not verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.artifacts import ArtifactError, ArtifactWriter, current_version, open_artifact, set_current


def _write(root: Path, payload: bytes = b"weights") -> str:
    writer = ArtifactWriter(root, "thing")
    writer.path("model.bin").write_bytes(payload)
    writer.save_array("table.npy", np.arange(5, dtype=np.int32))
    return writer.commit("test.kind", {"alpha": 1}, {"score": 0.5}).version


def test_commit_writes_manifest_with_checksums_and_moves_current(tmp_path: Path) -> None:
    version = _write(tmp_path)
    assert current_version(tmp_path, "thing") == version
    artifact = open_artifact(tmp_path, "thing", "test.kind")
    assert artifact.version == version
    assert set(artifact.manifest["files"]) == {"model.bin", "table.npy"}
    assert all(len(entry["sha256"]) == 64 for entry in artifact.manifest["files"].values())
    assert artifact.params == {"alpha": 1}
    assert artifact.metrics == {"score": 0.5}
    np.testing.assert_array_equal(artifact.load_array("table.npy"), np.arange(5))
    assert not list((tmp_path / "thing").glob(".staging-*"))


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    version = _write(tmp_path)
    (tmp_path / "thing" / version / "model.bin").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for model\.bin"):
        open_artifact(tmp_path, "thing", "test.kind")


def test_missing_file_and_wrong_kind_are_refused(tmp_path: Path) -> None:
    version = _write(tmp_path)
    with pytest.raises(ArtifactError, match=r"kind is 'test\.kind'"):
        open_artifact(tmp_path, "thing", "other.kind")
    (tmp_path / "thing" / version / "table.npy").unlink()
    with pytest.raises(ArtifactError, match=r"table\.npy listed in the manifest is missing"):
        open_artifact(tmp_path, "thing", "test.kind")


def test_corrupt_manifest_and_path_tricks_are_refused(tmp_path: Path) -> None:
    version = _write(tmp_path)
    with pytest.raises(ArtifactError, match="invalid artifact version"):
        open_artifact(tmp_path, "thing", "test.kind", version="../../etc")
    (tmp_path / "thing" / version / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_artifact(tmp_path, "thing", "test.kind")


def test_no_current_version_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="vitrine build"):
        open_artifact(tmp_path, "thing", "test.kind")


def test_old_version_stays_loadable_and_current_can_move_back(tmp_path: Path) -> None:
    first = _write(tmp_path, b"one")
    second = _write(tmp_path, b"two")
    assert current_version(tmp_path, "thing") == second
    set_current(tmp_path, "thing", first)
    assert open_artifact(tmp_path, "thing", "test.kind").version == first
    with pytest.raises(ArtifactError):
        set_current(tmp_path, "thing", "no-such-version")


def test_object_arrays_cannot_be_stored(tmp_path: Path) -> None:
    writer = ArtifactWriter(tmp_path, "thing")
    with pytest.raises(ArtifactError, match="object arrays"):
        writer.save_array("bad.npy", np.array([{"a": 1}], dtype=object))
    writer.abort()
    assert not (tmp_path / "thing" / "CURRENT").exists()


def test_manifest_is_plain_json(tmp_path: Path) -> None:
    version = _write(tmp_path)
    manifest = json.loads((tmp_path / "thing" / version / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["kind"] == "test.kind"
