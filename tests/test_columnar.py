"""The columnar Retrieve answer (RetrieveRequest.columnar) against the per-candidate one, on a
real retrieval server on loopback: the ranking client must read the very same candidates
from either form, fresh (upserted) items and multi-source mixes included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_service.ragged import Ragged, RaggedRows, rows_of
from ranking_service.retrieval_client import RetrievedCandidates, _candidates, retrieved
from shared.data import Dataset
from shared.proto.vitrine.v1 import retrieval_pb2
from tests.conftest import BuiltArtifacts
from tests.fakes import HashingEmbedder
from tests.test_catalog_updates import FRESH_TITLE, TIMEOUT_S, Live, _item, live_server
from tests.test_sources import _history


def _both(live: Live, request: retrieval_pb2.RetrieveRequest) -> tuple[RetrievedCandidates, RetrievedCandidates]:
    per_candidate: retrieval_pb2.RetrieveResponse = live.stub.Retrieve(request, timeout=TIMEOUT_S)
    assert not per_candidate.HasField("columns")
    as_columns = retrieval_pb2.RetrieveRequest()
    as_columns.CopyFrom(request)
    as_columns.columnar = True
    columnar: retrieval_pb2.RetrieveResponse = live.stub.Retrieve(as_columns, timeout=TIMEOUT_S)
    assert columnar.HasField("columns")
    assert not columnar.candidates
    return _candidates(per_candidate.candidates, per_candidate.index_version), retrieved(columnar)


def _assert_same(old: RetrievedCandidates, new: RetrievedCandidates) -> None:
    assert new.item_ids == old.item_ids
    for name in ("scores", "content_scores", "collaborative_scores", "stock"):
        assert np.array_equal(getattr(new, name), getattr(old, name)), name
    assert (new.from_popular, new.index_version) == (old.from_popular, old.index_version)
    assert tuple(new.sources) == tuple(old.sources)
    assert tuple(new.source_scores) == tuple(old.source_scores)
    assert tuple(new.anchor_ids) == tuple(old.anchor_ids)
    fresh_old = [(i, a.item_id, a.title) for i, a in enumerate(old.fresh_items) if a is not None]
    fresh_new = [(i, a.item_id, a.title) for i, a in enumerate(new.fresh_items) if a is not None]
    assert fresh_new == fresh_old


def test_columnar_answer_reads_like_the_per_candidate_one(
    artifacts: BuiltArtifacts, embedder: HashingEmbedder, dataset: Dataset, tmp_path: Path
) -> None:
    history = _history(dataset, length=8)
    mix = [
        retrieval_pb2.SourceQuota(source=source, share=share)
        for source, share in (("fused", 0.4), ("covisitation", 0.3), ("content", 0.2), ("trending", 0.1))
    ]
    with live_server(artifacts.root, tmp_path, embedder) as live:
        live.stub.UpsertItems(
            retrieval_pb2.UpsertItemsRequest(items=[_item("fresh-1", FRESH_TITLE), _item("fresh-2", FRESH_TITLE)]),
            timeout=TIMEOUT_S,
        )
        requests = [
            # The default mix (one source), anchors from the history.
            retrieval_pb2.RetrieveRequest(history=retrieval_pb2.ItemHistory(item_ids=history), n=60),
            # Several sources per candidate, session anchors.
            retrieval_pb2.RetrieveRequest(
                history=retrieval_pb2.ItemHistory(item_ids=history[2:]),
                n=60,
                mix=mix,
                session_item_ids=history[:2],
            ),
            # Fresh items among the candidates.
            retrieval_pb2.RetrieveRequest(text=FRESH_TITLE, n=20),
            # Cold start: popular items.
            retrieval_pb2.RetrieveRequest(user_id="nobody-at-all", n=15),
        ]
        for request in requests:
            old, new = _both(live, request)
            assert old.item_ids
            _assert_same(old, new)
        _, fresh = _both(live, requests[2])
        assert {a.item_id for a in fresh.fresh_items if a is not None} == {"fresh-1", "fresh-2"}
        _, mixed = _both(live, requests[1])
        assert max(len(tags) for tags in mixed.sources) > 1
        assert any(mixed.anchor_ids)
        _, cold = _both(live, requests[3])
        assert cold.from_popular


def test_ragged_reads_like_tuples_and_maps_rows() -> None:
    ids = Ragged.from_codes(["a", "b", "zz"], [0, 1, 2, 1], [2, 0, 2])
    assert list(ids) == [("a", "b"), (), ("zz", "b")]
    assert (len(ids), ids[-1], ids[0:2]) == (3, ("zz", "b"), (("a", "b"), ()))
    with pytest.raises(IndexError):
        ids[3]
    kept = ids.kept(np.asarray([True, False, True]))
    assert list(kept) == [("a", "b"), ("zz", "b")]
    rows = rows_of(kept, {"a": 5, "b": 7})  # "zz" is unknown: dropped
    assert isinstance(rows, RaggedRows)
    assert [r.tolist() for r in rows] == [[5, 7], [7]]
    masked = rows_of(ids, {"a": 5, "b": 7}, np.asarray([False, True, True]))
    assert [r.tolist() for r in masked] == [[], [7]]
    plain = Ragged.from_counts([1.0, 2.0], [1, 0, 1])
    assert list(plain) == [(1.0,), (), (2.0,)]
    with pytest.raises(ValueError, match="offsets end at"):
        Ragged.from_counts([1.0], [2])
