"""Experiments: variants assigned by a stable hash of the user id.

A user's bucket is the first 8 bytes of SHA-256(salt + NUL + user id) read as a number in
[0, 1): the same in every process, on every machine, across restarts (Python's ``hash``
is salted per process and would not be). Variants take consecutive slices of [0, 1) in
configuration order, each ``share`` wide; a bucket past the last slice is control ("").
A variant may pin a ranker artifact version: its trees are loaded alongside the current
ranker and score that variant's requests (features still come from the current snapshot,
so the pinned model must have been trained on the same FEATURE_NAMES: checked at load).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ranking_service.artifact import DEFAULT_NAME, KIND, load_ranker_model
from ranking_service.scoring import RankerModel
from shared.artifacts import open_artifact
from shared.config import ExperimentsSettings, ExperimentVariant

CONTROL = ""


def bucket(user_id: str, salt: str) -> float:
    """The user's stable position in [0, 1)."""
    digest = hashlib.sha256(f"{salt}\0{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(user_id: str, settings: ExperimentsSettings) -> ExperimentVariant | None:
    """The variant this user is in, or None for control."""
    if not settings.variants:
        return None
    position = bucket(user_id, settings.salt)
    upper = 0.0
    for variant in settings.variants:
        upper += variant.share
        if position < upper:
            return variant
    return None


def load_pinned_models(root: Path, settings: ExperimentsSettings, name: str = DEFAULT_NAME) -> dict[str, RankerModel]:
    """The models (trees and prior) of the ranker versions the variants pin, by version."""
    return {
        version: load_ranker_model(open_artifact(root, name, KIND, version))
        for version in sorted({v.model_version for v in settings.variants if v.model_version})
    }
