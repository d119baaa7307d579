"""Versioned, checksummed artifact directories.

Layout: ``<root>/<name>/<version>/`` holds the files and ``manifest.json``
(schema version, kind, creation time, parameters, metrics and the size and sha256
of every file). ``<root>/<name>/CURRENT`` names the version to serve; it is
replaced atomically once a version is complete, so a reader never sees half an
artifact. Loaders call :func:`open_artifact`, which refuses anything whose
manifest does not verify.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MANIFEST_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, tampered with or of the wrong kind."""


@dataclass(frozen=True)
class Artifact:
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    def file(self, relative: str) -> Path:
        if relative not in self.manifest["files"]:
            raise ArtifactError(f"{self.path}: {relative!r} is not listed in the manifest")
        return self.path / relative

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.manifest.get("params", {}))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics", {}))

    def load_array(self, relative: str, mmap: bool = False) -> npt.NDArray[Any]:
        """``mmap``: map the (verified, immutable) file read-only instead of copying it into
        memory: start-up skips reading it again, pages come in on first use."""
        # allow_pickle=False: object arrays would be a code-execution vector.
        array: npt.NDArray[Any] = np.load(self.file(relative), allow_pickle=False, mmap_mode="r" if mmap else None)
        return array


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version() -> str:
    """Sortable, unique: UTC time plus a random suffix."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


class ArtifactWriter:
    """Write files into a staging directory, then :meth:`commit` to publish them.

    Nothing is visible under the version name until ``commit`` has written the
    manifest, renamed the directory into place and moved ``CURRENT``. Used as a
    context manager, an exception discards the staging directory.
    """

    def __init__(self, root: Path, name: str, version: str | None = None) -> None:
        self.name = name
        self.version = version or new_version()
        self.base = Path(root) / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.staging = self.base / f".staging-{self.version}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()

    def path(self, relative: str) -> Path:
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def save_array(self, relative: str, array: npt.NDArray[Any]) -> None:
        if array.dtype == object:
            raise ArtifactError(f"{relative}: object arrays cannot be stored safely")
        np.save(self.path(relative), array, allow_pickle=False)

    def save_json(self, relative: str, payload: Any) -> None:
        self.path(relative).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def commit(
        self,
        kind: str,
        params: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        make_current: bool = True,
    ) -> Artifact:
        files = {
            str(path.relative_to(self.staging)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
            for path in sorted(self.staging.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "name": self.name,
            "kind": kind,
            "version": self.version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "params": params,
            "metrics": metrics or {},
            "files": files,
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        final = self.base / self.version
        os.replace(self.staging, final)
        if make_current:
            set_current(self.base.parent, self.name, self.version)
        return Artifact(self.name, self.version, final, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # Whatever went wrong, leave no half-written staging directory behind.
        if exc_type is not None:
            self.abort()


def set_current(root: Path, name: str, version: str) -> None:
    base = Path(root) / name
    if not (base / version / MANIFEST).is_file():
        raise ArtifactError(f"{base / version}: no such artifact version")
    temporary = base / f".{CURRENT}.{secrets.token_hex(4)}"
    temporary.write_text(version + "\n")
    os.replace(temporary, base / CURRENT)


def current_version(root: Path, name: str) -> str:
    pointer = Path(root) / name / CURRENT
    if not pointer.is_file():
        raise ArtifactError(f"{pointer}: not found; build the artifact first (vitrine build --out {root})")
    version = pointer.read_text().strip()
    _check_version(version)
    return version


def _check_version(version: str) -> None:
    if not version or "/" in version or "\\" in version or version.startswith("."):
        raise ArtifactError(f"invalid artifact version {version!r}")


def open_current(root: Path, name: str) -> Artifact:
    """Open and verify the CURRENT version of ``name``, whatever its kind (for tools, not servers)."""
    version = current_version(root, name)
    manifest_path = Path(root) / name / version / MANIFEST
    try:
        kind = json.loads(manifest_path.read_text())["kind"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"{manifest_path}: unreadable manifest: {err}") from err
    return open_artifact(root, name, str(kind), version)


def open_artifact(root: Path, name: str, kind: str, version: str | None = None) -> Artifact:
    """Open and verify an artifact; raises :class:`ArtifactError` if anything is off."""
    version = version or current_version(root, name)
    _check_version(version)
    path = Path(root) / name / version
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: not found")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {err}") from err
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(f"{manifest_path}: unsupported manifest schema {manifest.get('schema_version')!r}")
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{manifest_path}: kind is {manifest.get('kind')!r}, expected {kind!r}")
    for relative, entry in manifest.get("files", {}).items():
        file_path = path / relative
        if not file_path.is_file():
            raise ArtifactError(f"{path}: file {relative} listed in the manifest is missing")
        if file_path.stat().st_size != entry["bytes"] or _sha256(file_path) != entry["sha256"]:
            raise ArtifactError(f"{path}: checksum mismatch for {relative}; refusing a modified artifact")
    return Artifact(name=name, version=version, path=path, manifest=manifest)
