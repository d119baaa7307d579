"""The item model both services use: EASE item-item weights (Steck, 2019), sparsified.

Retrieval proposes candidates with it (the ``item_model`` source) and the ranker scores
candidates with it (the ``item_model_*`` features); each fits it on the events its own
build may see. A user's score for item j sums row i of the weights over their items i.

EASE is fitted on a user's items as one row and, beside those, on each of their sessions
(``session_rows``): MovieLens 100K users rate page by page, and a held-out rating is more
often on a page with the user's other ratings than the user's whole history says.

The weights are dense (an items x items inverse), so there is no item model above
``ItemModelSettings.max_items`` items with events. Each item keeps the ``neighbours``
weights largest in magnitude: EASE's negative weights matter (they push down items that
popular history items predict without cause); keeping only the largest positive ones cost
NDCG@10 0.484 -> 0.469 on MovieLens 100K (random split, 200 per item), by magnitude 0.482.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from shared.config import ItemModelSettings
from shared.data import Dataset, Events
from shared.evaluation.baselines import EASE, EASE_BASELINE, TrainPart, ease_weights, tune
from shared.evaluation.protocols import Split, split
from shared.logs import event

log = logging.getLogger(__name__)

TUNING_K = 10
# Tuning results of this process by (events digest, catalogue and user counts, settings,
# seed), oldest first; a build needs a few.
TUNED_KEPT = 8
_TUNED: dict[tuple[str, int, int, str, int], ItemModelSettings] = {}


def session_index(events: Events, gap_s: int) -> npt.NDArray[np.int64]:
    """Each event's session: events of one user with one session_id, cut wherever two of
    them are more than ``gap_s`` seconds apart (events without a session_id are cut by time
    alone)."""
    if not len(events):
        return np.zeros(0, dtype=np.int64)
    _, labels = np.unique(events.session_id, return_inverse=True)
    order = np.lexsort((events.timestamp, events.user_index, labels))
    key_user, key_label = events.user_index[order], labels[order]
    times = events.timestamp[order].astype(np.int64)
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (key_user[1:] != key_user[:-1]) | (key_label[1:] != key_label[:-1]) | (np.diff(times) > gap_s)
    session = np.empty(len(order), dtype=np.int64)
    session[order] = np.cumsum(starts) - 1
    return session


def _binary_rows(
    rows: npt.NDArray[np.integer], columns: npt.NDArray[np.integer], shape: tuple[int, int]
) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, columns)), shape=shape)
    matrix.data[:] = 1.0  # repeated events of a pair were summed: EASE fits a binary matrix
    return matrix


def session_rows(
    events: Events, columns: npt.NDArray[np.integer], n_columns: int, user_entries: int, settings: ItemModelSettings
) -> sp.csr_matrix:
    """The session rows EASE is fitted on beside the user rows: binary, each scaled by
    1/sqrt(its length) so that long sessions do not dominate, and together weighing
    ``settings.session_weight`` times the ``user_entries`` of the user rows (the Gram
    traces). Empty when the weight is 0."""
    if settings.session_weight <= 0 or not len(events):
        return sp.csr_matrix((0, n_columns), dtype=np.float32)
    session = session_index(events, settings.session_gap_s)
    sessions = _binary_rows(session, columns, (int(session.max()) + 1, n_columns))
    lengths = np.diff(sessions.indptr).astype(np.float64)
    scale = np.sqrt(settings.session_weight * user_entries / len(lengths) / lengths)
    return sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ sessions)


def fit_item_model(events: Events, n_items: int, settings: ItemModelSettings) -> sp.csr_matrix | None:
    """The sparsified EASE weights of ``events`` (user rows and, by
    ``settings.session_weight``, session rows) as an (n_items, n_items) CSR matrix; None
    when more than ``settings.max_items`` items have events (the dense inverse would not fit)."""
    active = np.unique(events.item_index)
    if not len(active) or len(active) > settings.max_items:
        return None
    column = np.zeros(n_items, dtype=np.int64)
    column[active] = np.arange(len(active))
    columns = column[events.item_index]
    touched = _binary_rows(events.user_index, columns, (int(events.user_index.max()) + 1, len(active)))
    fitted = sp.vstack([touched, session_rows(events, columns, len(active), touched.nnz, settings)], format="csr")
    weights = ease_weights(fitted, settings.l2, max_items=settings.max_items)
    keep = min(settings.neighbours, len(active) - 1)
    if keep <= 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    strongest = np.argpartition(-np.abs(weights), keep - 1, axis=1)[:, :keep]
    values = np.take_along_axis(weights, strongest, axis=1)
    rows = np.repeat(active, keep)
    return sp.csr_matrix(
        (values.ravel(), (rows, active[strongest.ravel()])), shape=(n_items, n_items), dtype=np.float32
    )


def tuned_item_model(dataset: Dataset, settings: ItemModelSettings, seed: int) -> ItemModelSettings:
    """``settings`` tuned as the evaluation tunes its EASE baseline, by NDCG@10 on random
    per-user splits of ``dataset``'s events (seeds ``seed``, ``seed + 1``, ...): first the
    session gap (over ``session_gaps_s``, on the first split at ``l2``), then ``l2`` (over
    ``l2_grid``, by default the EASE baseline's grid, by the mean of ``tune_splits``
    splits). Gaps differ by more than one split's noise and l2 values by less, and each fit
    is a dense inverse: this order costs gaps + grid x splits fits instead of their
    product. Unchanged when tuning is off or more than ``tune_max_items`` items have
    events. A process asked again with the same events, settings and seed answers from
    memory."""
    active = np.unique(dataset.events.item_index)
    if not settings.tune or not len(active) or len(active) > min(settings.tune_max_items, settings.max_items):
        return settings
    # One build tunes on the same events more than once (a training index and the ranker's
    # history; the serving index and the ranker's snapshot), each call 20 dense inverses:
    # about 90 s at 5,000 items. The same events, settings and seed give the same answer.
    key = (dataset.events.digest(), len(dataset.catalog), len(dataset.users), settings.model_dump_json(), seed)
    if key in _TUNED:
        reused = _TUNED[key]
        event(log, "item model tuning reused", l2=reused.l2, session_gap_s=reused.fitted_session_gap_s)
        return reused
    tuned = _tune(dataset, settings, seed, active)
    _TUNED[key] = tuned
    while len(_TUNED) > TUNED_KEPT:
        del _TUNED[next(iter(_TUNED))]
    return tuned


def _tune(dataset: Dataset, settings: ItemModelSettings, seed: int, active: npt.NDArray[np.int32]) -> ItemModelSettings:
    column = np.full(len(dataset.catalog), -1, dtype=np.int32)
    column[active] = np.arange(len(active), dtype=np.int32)
    validations = [split(dataset, "random", seed + offset) for offset in range(settings.tune_splits)]
    validations = [validation for validation in validations if len(validation.evaluated_users)]
    if not validations:
        return settings

    def trials(validation: Split, candidate: ItemModelSettings, grid: list[float]) -> list[tuple[float, float]]:
        """(l2, NDCG@10) of each l2 in ``grid`` on ``validation``, sessions as ``candidate`` says."""
        train = validation.train_matrix()[:, active].tocsr()
        events = validation.train.events
        sessions = session_rows(events, column[events.item_index], len(active), train.nnz, candidate)
        baseline = replace(EASE_BASELINE, build=functools.partial(EASE, extra_rows=sessions), grid={"l2": grid})
        held_out = [column[items] for items in validation.test_items]
        tuned = tune(baseline, TrainPart(train), held_out, validation.evaluated_users, TUNING_K)
        return [(float(params["l2"]), ndcg) for params, ndcg in tuned.trials]

    chosen = settings
    if settings.session_weight > 0 and len(settings.session_gaps_s) > 1:
        gap_ndcg = {
            gap_s: trials(validations[0], settings.model_copy(update={"session_gap_s": gap_s}), [settings.l2])[0][1]
            for gap_s in settings.session_gaps_s
        }
        chosen = settings.model_copy(update={"session_gap_s": max(gap_ndcg, key=lambda gap_s: gap_ndcg[gap_s])})
    elif settings.session_weight > 0:
        chosen = settings.model_copy(update={"session_gap_s": settings.session_gaps_s[0]})
    ndcgs: dict[float, list[float]] = {}
    for validation in validations:
        for l2, ndcg in trials(validation, chosen, settings.l2_grid):
            ndcgs.setdefault(l2, []).append(ndcg)
    l2 = max(ndcgs, key=lambda value: float(np.mean(ndcgs[value])))
    event(
        log,
        "item model tuned",
        l2=l2,
        session_gap_s=chosen.fitted_session_gap_s,
        validation_ndcg=round(float(np.mean(ndcgs[l2])), 4),
        splits=len(validations),
    )
    return chosen.model_copy(update={"l2": l2})
