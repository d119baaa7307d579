"""Which shard an item or a user belongs to, and what a shard's artifact is called.

The split must be the same in every process and every release: it decides which shard
holds an item, so it is a BLAKE2b digest of the id (Python's ``hash()`` is salted per
process). Items and users are split by the same function of their own ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt


def shard_of(key: str, shards: int) -> int:
    """The shard (0..shards-1) that holds ``key``; stable across processes and platforms."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def shard_assignments(keys: Iterable[str], shards: int) -> npt.NDArray[np.int32]:
    """``shard_of`` for every key, as an array aligned with ``keys``."""
    return np.fromiter((shard_of(key, shards) for key in keys), dtype=np.int32)


def shard_artifact_name(name: str, shard: int, shards: int) -> str:
    """``index`` for a whole index; ``index-shard-1-of-3`` for shard 1 of 3."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in 0..{shards - 1}, got {shard}")
    return name if shards == 1 else f"{name}-shard-{shard}-of-{shards}"
