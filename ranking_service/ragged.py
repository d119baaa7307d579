"""Per-candidate lists kept flat: one list of values and one offset per candidate.

A columnar retrieval answer (``RetrieveResponse.columns``) sends every candidate's sources,
source scores and anchor items flattened with a count per candidate. Keeping them that way
costs nothing per candidate; :class:`Ragged` and :class:`RaggedRows` still read like the
tuple-of-tuples (and tuple-of-arrays) they replace, and the few consumers on the hot path
(source features, anchor rows) use the flat arrays directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Generic, TypeVar, overload

import numpy as np
import numpy.typing as npt

Value = TypeVar("Value")


def offsets_of(counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Start of each candidate's values, then the end of the last: ``len(counts) + 1`` entries."""
    offsets = np.zeros(len(np.asarray(counts)) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


class Ragged(Sequence[tuple[Value, ...]], Generic[Value]):
    """Entry ``i`` is ``tuple(values[offsets[i]:offsets[i + 1]])``."""

    def __init__(
        self,
        values: list[Value],
        offsets: npt.NDArray[np.int64],
        table: list[Value] | None = None,
        codes: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """``table`` and ``codes``, when given: ``values[j] == table[codes[j]]`` (the coded form
        of a columnar answer; :func:`rows_of` then looks up each distinct value once)."""
        if len(offsets) < 1 or int(offsets[-1]) != len(values):
            raise ValueError(f"offsets end at {int(offsets[-1]) if len(offsets) else None}, values hold {len(values)}")
        self.values = values
        self.offsets = offsets
        self.table = table
        self.codes = codes
        self._bounds = offsets.tolist()

    @classmethod
    def from_counts(cls, values: list[Value], counts: npt.ArrayLike) -> Ragged[Value]:
        return cls(values, offsets_of(counts))

    @classmethod
    def from_codes(cls, table: list[Value], codes: npt.ArrayLike, counts: npt.ArrayLike) -> Ragged[Value]:
        """Entry ``i`` holds ``table[c]`` for its ``counts[i]`` codes (codes flattened in order)."""
        code_array = np.asarray(codes, dtype=np.int64)
        return cls([table[code] for code in code_array.tolist()], offsets_of(counts), table, code_array)

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        return np.diff(self.offsets)

    @property
    def owners(self) -> npt.NDArray[np.int64]:
        """For every flat value, the position of the candidate it belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.counts)

    def __len__(self) -> int:
        return len(self._bounds) - 1

    @overload
    def __getitem__(self, index: int) -> tuple[Value, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[Value, ...], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[Value, ...] | tuple[tuple[Value, ...], ...]:
        if isinstance(index, slice):
            return tuple(self[position] for position in range(*index.indices(len(self))))
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return tuple(self.values[self._bounds[position] : self._bounds[position + 1]])

    def __iter__(self) -> Iterator[tuple[Value, ...]]:
        bounds = self._bounds
        values = self.values
        for start, end in pairwise(bounds):
            yield tuple(values[start:end])

    def extended(self, entries: Sequence[tuple[Value, ...]]) -> Ragged[Value]:
        """These entries followed by ``entries`` (flat, uncoded: the new values need not be in
        the table)."""
        counts = np.concatenate([self.counts, np.asarray([len(entry) for entry in entries], dtype=np.int64)])
        return Ragged(self.values + [value for entry in entries for value in entry], offsets_of(counts))

    def kept(self, mask: npt.NDArray[np.bool_]) -> Ragged[Value]:
        """The entries where ``mask`` is true, in order."""
        flat = np.repeat(mask, self.counts)
        return Ragged(
            [value for value, keep in zip(self.values, flat.tolist(), strict=True) if keep],
            offsets_of(self.counts[mask]),
            self.table,
            None if self.codes is None else self.codes[flat],
        )


class RaggedRows(Sequence[npt.NDArray[np.int32]]):
    """Entry ``i`` is the array ``rows[offsets[i]:offsets[i + 1]]`` (a view)."""

    def __init__(self, rows: npt.NDArray[np.int32], offsets: npt.NDArray[np.int64]) -> None:
        if len(offsets) < 1 or int(offsets[-1]) != len(rows):
            raise ValueError(f"offsets end at {int(offsets[-1]) if len(offsets) else None}, rows hold {len(rows)}")
        self.rows = rows
        self.offsets = offsets
        self._bounds = offsets.tolist()

    def __len__(self) -> int:
        return len(self._bounds) - 1

    @overload
    def __getitem__(self, index: int) -> npt.NDArray[np.int32]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[npt.NDArray[np.int32], ...]: ...

    def __getitem__(self, index: int | slice) -> npt.NDArray[np.int32] | tuple[npt.NDArray[np.int32], ...]:
        if isinstance(index, slice):
            return tuple(self[position] for position in range(*index.indices(len(self))))
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return self.rows[self._bounds[position] : self._bounds[position + 1]]


def rows_of(ids: Ragged[str], row_of: dict[str, int], keep: npt.NDArray[np.bool_] | None = None) -> RaggedRows:
    """The rows of the ids ``row_of`` knows, per entry (unknown ids dropped, order kept), for
    the entries ``keep`` allows (all when None)."""
    if ids.table is not None and ids.codes is not None:
        table_rows = np.fromiter((row_of.get(value, -1) for value in ids.table), np.int64, len(ids.table))
        rows = table_rows[ids.codes]
    else:
        rows = np.fromiter((row_of.get(value, -1) for value in ids.values), np.int64, len(ids.values))
    known = rows >= 0
    owners = ids.owners
    if keep is not None:
        known &= keep[owners]
        positions = np.flatnonzero(keep)
    else:
        positions = np.arange(len(ids))
    counts = np.bincount(owners[known], minlength=len(ids))[positions]
    return RaggedRows(rows[known].astype(np.int32), offsets_of(counts))
