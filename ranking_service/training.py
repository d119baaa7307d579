"""Train the LightGBM LambdaMART ranker on candidates from the retrieval service.

Time split: :func:`shared.interactions.ranker_label_mask` marks the label events
(after one global cutoff, or each user's newest ones); the retrieval service serves an
index built from all other events. For every user with label events, one request is
replayed at a point in the session of their first label event (history = everything
before that moment, session = the session so far). Candidates come from the retrieval
service through the serving code path, features are computed as of the request, and
labels are the user's interactions from that moment on (purchase 3 > cart 2 > view 1).

A share of users is held out entirely: on them the trained ranker's NDCG@10 is
compared with the retrieval order on the same candidates, and both are recorded in
the artifact manifest.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from ranking_service.artifact import (
    RankerSnapshot,
    load_ranker_snapshot,
    recorded_build_settings,
    served_item_model_settings,
    served_popularity,
    write_ranker_artifact,
)
from ranking_service.candidates import CandidateStage, kept_candidates
from ranking_service.capture import EVENTS, IMPRESSIONS, read_records
from ranking_service.features import CATEGORICAL_FEATURES, FEATURE_INDEX, FEATURE_NAMES, FeatureBuilder, RequestContext
from ranking_service.retrieval_client import RetrievalClient
from ranking_service.scoring import RankerModel, ScorePrior, in_retrieval_order, score_prior
from ranking_service.store import ItemTable, UserHistoryStore, item_stats
from shared.artifacts import Artifact
from shared.config import (
    IndexBuildSettings,
    ItemModelSettings,
    PopularityCounting,
    RankerBuildSettings,
    RankingSettings,
)
from shared.data import Catalog, Dataset, DatasetError, Events, Users
from shared.interactions import EVENT_LABEL, event_labels, ranker_label_mask
from shared.item_model import tuned_item_model
from shared.logs import event
from shared.metrics import mean, ndcg_at_k

log = logging.getLogger(__name__)

EVAL_K = 10
# The replayed request sits after 0..MAX_SESSION_PREFIX events of the returning session.
MAX_SESSION_PREFIX = 3
RETRIEVAL_TIMEOUT_S = 10.0
# Share of the training users whose requests decide early stopping.
VALIDATION_USERS = 0.15


def label_mask(
    dataset: Dataset, settings: RankerBuildSettings, cutoff: int | None = None, draw: int = 0
) -> npt.NDArray[np.bool_]:
    """The label events: after ``cutoff`` when given, else as ``settings.label_split`` says
    (``draw``: which of the random split's ``label_draws``)."""
    if cutoff is not None:
        return np.asarray(dataset.events.timestamp >= cutoff)
    return ranker_label_mask(dataset.events, settings.label_split, settings.label_window, settings.seed, draw)


@dataclass(frozen=True)
class ReplayedRequest:
    user_id: str
    context: RequestContext
    # Relevance per catalogue row, for rows the user touched from the request on.
    labels: dict[int, int]
    holdout: bool


def replay_requests(
    dataset: Dataset, labels_mask: npt.NDArray[np.bool_], settings: RankerBuildSettings
) -> list[ReplayedRequest]:
    """One request per user with label events, at a point in the session of the first one."""
    events = dataset.events
    if settings.label_split == "random":
        return _requests_after_everything(dataset, labels_mask, settings)
    rng = np.random.default_rng(settings.seed)
    future = np.flatnonzero(labels_mask)
    order = future[np.lexsort((events.timestamp[future], events.user_index[future]))]
    users = events.user_index[order]
    boundaries = np.flatnonzero(np.diff(users)) + 1
    requests: list[ReplayedRequest] = []
    labels_all = event_labels(events.event_code)
    created_at = dataset.catalog.created_at
    for user_events in np.split(order, boundaries):
        if not len(user_events):
            continue
        user_id = str(dataset.users.user_ids[events.user_index[user_events[0]]])
        session = user_events[events.session_id[user_events] == events.session_id[user_events[0]]]
        prefix = int(rng.integers(0, min(MAX_SESSION_PREFIX, len(session) - 1) + 1)) if len(session) > 1 else 0
        moment = int(events.timestamp[session[prefix]])
        labels: dict[int, int] = {}
        later = user_events[events.timestamp[user_events] >= moment]
        # An item created after the request was not there to recommend (see assemble).
        for index in later[created_at[events.item_index[later]] <= moment]:
            row = int(events.item_index[index])
            labels[row] = max(labels.get(row, 0), int(labels_all[index]))
        holdout = (zlib.crc32(user_id.encode()) % 1000) < settings.holdout_users * 1000
        requests.append(
            ReplayedRequest(
                user_id=user_id,
                context=RequestContext(
                    timestamp=moment,
                    device=str(events.device[session[0]]),
                    session_rows=events.item_index[session[:prefix]][::-1].astype(np.int32),
                ),
                labels=labels,
                holdout=holdout,
            )
        )
    return requests


def _requests_after_everything(
    dataset: Dataset, labels_mask: npt.NDArray[np.bool_], settings: RankerBuildSettings
) -> list[ReplayedRequest]:
    """Random label split: one request per user just after the last event, no session;
    labels are the user's label events, whenever they happened."""
    events = dataset.events
    moment = int(events.timestamp.max()) + 1
    labels_all = event_labels(events.event_code)
    chosen = np.flatnonzero(labels_mask)
    chosen = chosen[np.argsort(events.user_index[chosen], kind="stable")]
    boundaries = np.flatnonzero(np.diff(events.user_index[chosen])) + 1
    requests: list[ReplayedRequest] = []
    for user_events in np.split(chosen, boundaries):
        if not len(user_events):
            continue
        user_id = str(dataset.users.user_ids[events.user_index[user_events[0]]])
        labels: dict[int, int] = {}
        for index in user_events:
            row = int(events.item_index[index])
            labels[row] = max(labels.get(row, 0), int(labels_all[index]))
        requests.append(
            ReplayedRequest(
                user_id=user_id,
                context=RequestContext(
                    timestamp=moment, device=str(events.device[user_events[-1]]), session_rows=np.zeros(0, np.int32)
                ),
                labels=labels,
                holdout=(zlib.crc32(user_id.encode()) % 1000) < settings.holdout_users * 1000,
            )
        )
    return requests


@dataclass
class RankingData:
    features: list[npt.NDArray[np.float32]]
    labels: list[npt.NDArray[np.int32]]
    # All of the user's relevance labels (also for items retrieval missed), for ideal DCG.
    all_labels: list[npt.NDArray[np.int32]]
    # Whose request each group is (label draws repeat a user).
    user_ids: list[str]
    requests: int = 0
    with_relevant_candidate: int = 0
    relevant_total: int = 0
    relevant_retrieved: int = 0

    @classmethod
    def empty(cls) -> RankingData:
        return cls(features=[], labels=[], all_labels=[], user_ids=[])

    def stacked(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], list[int]]:
        return np.vstack(self.features), np.concatenate(self.labels), [len(y) for y in self.labels]

    def pooled_with(self, other: RankingData) -> RankingData:
        """The requests of both (e.g. two label draws), counters summed."""
        return RankingData(
            features=self.features + other.features,
            labels=self.labels + other.labels,
            all_labels=self.all_labels + other.all_labels,
            user_ids=self.user_ids + other.user_ids,
            requests=self.requests + other.requests,
            with_relevant_candidate=self.with_relevant_candidate + other.with_relevant_candidate,
            relevant_total=self.relevant_total + other.relevant_total,
            relevant_retrieved=self.relevant_retrieved + other.relevant_retrieved,
        )


def assemble(
    requests: list[ReplayedRequest],
    items: ItemTable,
    histories: UserHistoryStore,
    candidate_stage: CandidateStage,
    features: FeatureBuilder,
    description: str,
    exclude_history: bool = False,
) -> RankingData:
    """Candidates and features of each replayed request; ``exclude_history``: ask retrieval
    to leave out every item of the user's history, not only the purchased ones. Candidates
    created after a request's time are dropped: the replay runs against an index of today's
    catalogue, and an item launched later must not teach the ranker that an age of 0 is a
    sign of relevance. (Dropped here rather than excluded in the retrieval request: a large
    catalogue can launch more items within a label window than a request may exclude.)"""
    data = RankingData.empty()
    nothing_excluded = np.zeros(0, dtype=np.int32)
    for request in tqdm(requests, desc=description, unit="req", mininterval=2.0):
        history = histories.history(request.user_id, before=request.context.timestamp)
        excluded = np.unique(history.item_rows).astype(np.int32) if exclude_history else nothing_excluded
        retrieved = candidate_stage.retrieve(request.user_id, history, request.context, excluded, RETRIEVAL_TIMEOUT_S)
        candidates = retrieved.candidates
        candidates = kept_candidates(candidates, items.created_at[candidates.rows] <= request.context.timestamp)
        rows = candidates.rows
        labels = np.asarray([request.labels.get(int(row), 0) for row in rows], dtype=np.int32)
        data.requests += 1
        data.relevant_total += len(request.labels)
        data.relevant_retrieved += int((labels > 0).sum())
        if not len(rows) or not labels.any():
            continue
        data.with_relevant_candidate += 1
        data.features.append(features.build(history, request.context, candidates).values)
        data.labels.append(labels)
        data.all_labels.append(np.asarray(list(request.labels.values()), dtype=np.int32))
        data.user_ids.append(request.user_id)
    return data


def validation_groups(user_ids: Sequence[str], seed: int) -> npt.NDArray[np.bool_]:
    """Which request groups decide early stopping: every request of a ``VALIDATION_USERS``
    share of the users (at least one user on each side). By user, not by request: label
    draws repeat a user, and that user's other draw among the training requests would make
    the validation score too kind."""
    users, user_of_group = np.unique(np.asarray(user_ids), return_inverse=True)
    valid_users = np.random.default_rng(seed).random(len(users)) < VALIDATION_USERS
    valid_users[0] = valid_users[0] or not valid_users.any()
    valid_users[-1] = valid_users[-1] and not valid_users.all()
    return np.asarray(valid_users[user_of_group], dtype=bool)


def fit_ranker(
    train: RankingData, settings: RankerBuildSettings, prior: ScorePrior | None
) -> tuple[RankerModel, dict[str, Any]]:
    """LambdaMART from ``prior`` (LightGBM's init_score: the trees learn corrections to it),
    with early stopping on the requests of a share of the users."""
    is_valid = validation_groups(train.user_ids, settings.seed)

    def subset(mask: npt.NDArray[np.bool_]) -> lgb.Dataset:
        chosen = np.flatnonzero(mask)
        values = np.vstack([train.features[i] for i in chosen])
        return lgb.Dataset(
            values,
            init_score=prior.of(values) if prior is not None else None,
            label=np.concatenate([train.labels[i] for i in chosen]),
            group=[len(train.labels[i]) for i in chosen],
            feature_name=list(FEATURE_NAMES),
            categorical_feature=list(CATEGORICAL_FEATURES),
            free_raw_data=True,
        )

    params: dict[str, Any] = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [EVAL_K],
        "num_leaves": settings.num_leaves,
        "learning_rate": settings.learning_rate,
        "min_data_in_leaf": settings.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambdarank_truncation_level": 20,
        "seed": settings.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 2,
        "verbose": -1,
    }
    train_set = subset(~is_valid)
    valid_set = subset(is_valid)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=settings.num_trees,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)],
    )
    if booster.best_iteration:  # cut to the best iteration (early stopping)
        booster.model_from_string(booster.model_to_string(num_iteration=booster.best_iteration))
    described = {
        **params,
        "best_iteration": booster.best_iteration,
        "num_trees": settings.num_trees,
        "prior": {"feature": prior.feature, "weight": prior.weight} if prior is not None else None,
    }
    return RankerModel(booster, prior), described


def is_cold_start(features: npt.NDArray[np.float32]) -> bool:
    """A request without history and session (its feature rows say so): retrieval answered
    it with popular items."""
    first = features[0]
    return bool(first[FEATURE_INDEX["user_log_events"]] == 0 and first[FEATURE_INDEX["session_length"]] == 0)


def _holdout_ndcgs(model: RankerModel, holdout: RankingData) -> tuple[list[float], list[float], list[bool]]:
    """Per holdout request with a relevant candidate: NDCG@10 of the ranker's order (as
    served: cold-start requests in retrieval order unless the model ranks them), of the
    retrieval order, and whether it is a cold start."""
    ranker_ndcg, retrieval_ndcg, cold = [], [], []
    for features, labels, all_labels in zip(holdout.features, holdout.labels, holdout.all_labels, strict=True):
        cold.append(is_cold_start(features))
        scores = model.predict(features)
        if cold[-1] and not model.ranks_cold_start:
            scores = in_retrieval_order(scores)  # as the serving pipeline does
        ranker_ndcg.append(ndcg_at_k(labels[np.argsort(-scores, kind="stable")], EVAL_K, all_labels))
        retrieval_ndcg.append(ndcg_at_k(labels, EVAL_K, all_labels))  # candidates arrive in retrieval order
    return ranker_ndcg, retrieval_ndcg, cold


def gate_cold_start(
    model: RankerModel, holdout: RankingData, settings: RankerBuildSettings
) -> tuple[RankerModel, dict[str, Any]]:
    """Whether the ranker orders cold-start requests: only where the holdout's cold requests
    show it beating retrieval's popularity order (``settings.cold_start_gate``), with the
    figures that decided it."""
    ranker_ndcg, retrieval_ndcg, cold = _holdout_ndcgs(replace(model, ranks_cold_start=True), holdout)
    cold_ranker = [ndcg for ndcg, is_cold in zip(ranker_ndcg, cold, strict=True) if is_cold]
    cold_retrieval = [ndcg for ndcg, is_cold in zip(retrieval_ndcg, cold, strict=True) if is_cold]
    enough = len(cold_ranker) >= settings.cold_start_min_holdout_requests
    ranks = not settings.cold_start_gate or (enough and mean(cold_ranker) > mean(cold_retrieval))
    figures: dict[str, Any] = {
        "holdout_cold_start_requests": len(cold_ranker),
        f"holdout_cold_start_ndcg@{EVAL_K}_ranker": round(mean(cold_ranker), 4) if cold_ranker else None,
        f"holdout_cold_start_ndcg@{EVAL_K}_retrieval_order": round(mean(cold_retrieval), 4) if cold_ranker else None,
        "ranks_cold_start": ranks,
    }
    event(log, "cold-start gate", **figures, gate=settings.cold_start_gate)
    return replace(model, ranks_cold_start=ranks), figures


def compare_on_holdout(model: RankerModel, holdout: RankingData) -> dict[str, float]:
    """NDCG@10 of the ranker's order (as served), of the retrieval order and, for a ranker
    with a prior, of the prior alone on the same candidates: what the trees add."""
    ranker_ndcg, retrieval_ndcg, _ = _holdout_ndcgs(model, holdout)
    # Requests where retrieval found nothing relevant score 0 for every order.
    misses = holdout.requests - holdout.with_relevant_candidate
    ranker = mean(ranker_ndcg + [0.0] * misses)
    retrieval = mean(retrieval_ndcg + [0.0] * misses)
    prior_alone: dict[str, float] = {}
    if model.prior is not None:
        prior = model.prior
        prior_ndcg = [
            ndcg_at_k(labels[np.argsort(-prior.of(features), kind="stable")], EVAL_K, all_labels)
            for features, labels, all_labels in zip(holdout.features, holdout.labels, holdout.all_labels, strict=True)
        ]
        prior_alone[f"holdout_ndcg@{EVAL_K}_prior_alone"] = round(mean(prior_ndcg + [0.0] * misses), 4)
    return {
        "holdout_requests": holdout.requests,
        f"holdout_ndcg@{EVAL_K}_ranker": round(ranker, 4),
        f"holdout_ndcg@{EVAL_K}_retrieval_order": round(retrieval, 4),
        f"holdout_ndcg@{EVAL_K}_lift": round(ranker / retrieval - 1.0, 4) if retrieval > 0 else float("nan"),
        "holdout_candidate_recall": round(holdout.relevant_retrieved / max(holdout.relevant_total, 1), 4),
        **prior_alone,
    }


def importance(booster: lgb.Booster) -> dict[str, float]:
    """Gain per feature."""
    return dict(zip(FEATURE_NAMES, booster.feature_importance(importance_type="gain").round(1).tolist(), strict=True))


@dataclass(frozen=True)
class ReplayedDraw:
    train: RankingData
    # Draw 0 only (empty for later draws): its holdout users' requests.
    holdout: RankingData
    item_model: ItemModelSettings
    label_events: int


def _replay_draw(
    dataset: Dataset,
    retrieval: RetrievalClient,
    settings: RankerBuildSettings,
    serving: RankingSettings,
    items: ItemTable,
    cutoff: int | None,
    draw: int,
    popularity: PopularityCounting,
) -> ReplayedDraw:
    """Requests, candidates (from ``retrieval``, whose index has not seen this draw's labels)
    and features of one label draw, with item statistics from its history events only."""
    labels_mask = label_mask(dataset, settings, cutoff, draw)
    if not labels_mask.any() or labels_mask.all():
        raise ValueError(f"the label split leaves {int(labels_mask.sum())} of {len(labels_mask)} events as labels")
    requests = replay_requests(dataset, labels_mask, settings)
    # Item statistics only from history events, as the index the candidates come from.
    history_events = dataset.events.select(~labels_mask)
    # Time splits cut each history at the request; a random split must drop the label
    # events themselves, since the request comes after all of them.
    histories = UserHistoryStore(
        history_events if settings.label_split == "random" and cutoff is None else dataset.events,
        dataset.users.user_ids,
    )
    item_model = (
        tuned_item_model(replace(dataset, events=history_events), settings.item_model, settings.seed)
        if draw == 0
        else settings.item_model
    )
    settings = settings.model_copy(update={"item_model": item_model})
    stats = item_stats(
        history_events, len(items), int(history_events.timestamp.max()) + 1, settings, popularity=popularity
    )
    # Training must see real retrieval answers: a silent popular-items fallback would poison it.
    serving_for_training = serving.model_copy(update={"candidates": settings.candidates, "fallback_to_popular": False})
    candidate_stage = CandidateStage(
        items,
        items.row_of(),
        stats.popular_rows,
        retrieval,
        serving_for_training,
        popular_candidates=settings.popular_candidates,
    )
    builder = FeatureBuilder(items, stats)
    event(
        log,
        "replaying requests",
        draw=draw,
        requests=len(requests),
        label_split="cutoff" if cutoff is not None else settings.label_split,
        label_events=int(labels_mask.sum()),
        candidates=settings.candidates,
    )
    # A random label split asks to fill gaps in a history: an item already in it is never the
    # answer, and callers of that task exclude their seen items (vitrine evaluate does). Left
    # in, those certain negatives made early stopping end the ranker at its first tree on
    # ML-100k (holdout NDCG@10 0.200 -> 0.213 without them; docs/evaluation.md).
    exclude_history = settings.label_split == "random" and cutoff is None
    suffix = f" (draw {draw})" if draw else ""
    train = assemble(
        [r for r in requests if not r.holdout],
        items,
        histories,
        candidate_stage,
        builder,
        f"train requests{suffix}",
        exclude_history,
    )
    holdout = (
        assemble(
            [r for r in requests if r.holdout],
            items,
            histories,
            candidate_stage,
            builder,
            "holdout requests",
            exclude_history,
        )
        if draw == 0
        else RankingData.empty()
    )
    return ReplayedDraw(train, holdout, item_model, int(labels_mask.sum()))


def train_ranker_artifact(
    dataset: Dataset,
    retrievals: Sequence[RetrievalClient],
    root: Path,
    settings: RankerBuildSettings,
    serving: RankingSettings,
    items: ItemTable,
    index_build: IndexBuildSettings,
    cutoff: int | None = None,
) -> Artifact:
    """Replay every label draw against its own retrieval service (``retrievals[i]`` serves
    the index built without draw i's labels), fit on the pooled training requests, and
    compare with the retrieval order on draw 0's holdout users. ``index_build``: the
    settings of the index served with this ranker, whose popular items it counts alike."""
    started = time.perf_counter()
    # The item model fits sessions only for the tasks they help (an explicit cutoff is a
    # time split); the served copy and train-ranker --from-logs inherit the choice.
    task = "global" if cutoff is not None else settings.label_split
    settings = settings.for_label_split(task)
    # Popular items are counted as the index served with this ranker counts them.
    popularity = index_build.for_label_split(task).popularity
    draws = settings.label_draw_count(cutoff)
    if len(retrievals) != draws:
        raise ValueError(
            f"{draws} label draw(s) need as many retrieval services (one per training index), got {len(retrievals)}"
        )
    replayed: list[ReplayedDraw] = []
    for draw, retrieval in enumerate(retrievals):
        replayed.append(_replay_draw(dataset, retrieval, settings, serving, items, cutoff, draw, popularity))
        # The item model's L2 is tuned on draw 0's history; every later draw fits with it.
        settings = settings.model_copy(update={"item_model": replayed[0].item_model})
    train = functools.reduce(RankingData.pooled_with, (one.train for one in replayed))
    holdout = replayed[0].holdout
    if len(train.labels) < 20:
        raise ValueError(
            f"only {len(train.labels)} training requests have a relevant candidate; "
            "the dataset is too small or the label window too short"
        )
    model, lgb_params = fit_ranker(train, settings, score_prior(settings))
    model, cold_start = gate_cold_start(model, holdout, settings)
    metrics: dict[str, Any] = {
        "train_requests": train.requests,
        "train_requests_with_relevant_candidate": train.with_relevant_candidate,
        **compare_on_holdout(model, holdout),
        **cold_start,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    snapshot_at = int(dataset.events.timestamp.max()) + 1
    # Training tuned the item model on its history events; the served one is fitted on the
    # whole snapshot, so it is tuned again on those events, as retrieval's is (ML-100k: L2
    # 1000 on the history, 500 on the snapshot; docs/evaluation.md).
    snapshot = replace(dataset, events=dataset.events.before(snapshot_at))
    served_item_model = tuned_item_model(snapshot, settings.item_model, settings.seed)
    params = {
        "dataset": dataset.name,
        "cutoff": cutoff,
        "label_draws": draws,
        "label_events": replayed[0].label_events,
        "label_events_per_draw": [one.label_events for one in replayed],
        "ranker_build": settings.model_dump(),
        "lightgbm": lgb_params,
        "feature_importance_gain": importance(model.booster),
        "ranks_cold_start": model.ranks_cold_start,
    }
    return write_ranker_artifact(
        root, model.booster, items, dataset, snapshot_at, params, metrics, served_item_model, popularity
    )


# -- training from captured logs (vitrine train-ranker --from-logs) -----------------------------


class CaptureError(DatasetError):
    """Captured logs that cannot become a training set."""


@dataclass(frozen=True)
class LoggedRequest:
    request_id: str
    user_id: str
    # The served items' logged feature rows (FEATURE_NAMES order) and graded labels.
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int32]


def logged_requests(
    impressions: list[dict[str, Any]], events: list[dict[str, Any]], window_s: int
) -> list[LoggedRequest]:
    """Impressions joined with the events that followed them.

    An event of the same user and item labels an impression when it came after it: its
    timestamp is later than the impression's and at most ``window_s`` later, or it names
    the impression's request_id (the caller says it followed that answer). An event at or
    before the impression's time never labels it (no leakage). Labels: purchase 3 > cart 2
    > wishlist, view 1 > nothing 0; several events keep the highest.
    """
    outcomes: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for record in events:
        key = (str(record["user_id"]), str(record["item_id"]))
        outcomes.setdefault(key, []).append(
            (int(record["timestamp"]), int(record["event_code"]), str(record.get("request_id", "")))
        )
    requests: list[LoggedRequest] = []
    for impression in impressions:
        items = impression.get("items") or []
        if not items:
            continue
        user_id, request_id, shown_at = (
            str(impression["user_id"]),
            str(impression["request_id"]),
            int(impression["timestamp"]),
        )
        features = np.asarray([item["features"] for item in items], dtype=np.float32)
        if features.shape != (len(items), len(FEATURE_NAMES)):
            raise CaptureError(
                f"impression {request_id}: feature rows of shape {features.shape}, expected "
                f"({len(items)}, {len(FEATURE_NAMES)})"
            )
        labels = np.zeros(len(items), dtype=np.int32)
        for position, item in enumerate(items):
            for timestamp, code, event_request in outcomes.get((user_id, str(item["item_id"])), ()):
                if event_request == request_id or shown_at < timestamp <= shown_at + window_s:
                    labels[position] = max(int(labels[position]), EVENT_LABEL.get(code, 0))
        requests.append(LoggedRequest(request_id, user_id, features, labels))
    return requests


def _ranking_data(requests: list[LoggedRequest]) -> RankingData:
    data = RankingData.empty()
    for request in requests:
        data.requests += 1
        relevant = int((request.labels > 0).sum())
        data.relevant_total += relevant
        data.relevant_retrieved += relevant
        if not relevant:
            continue
        data.with_relevant_candidate += 1
        data.features.append(request.features)
        data.labels.append(request.labels)
        data.all_labels.append(request.labels[request.labels > 0])
        data.user_ids.append(request.user_id)
    return data


def snapshot_with_logged_events(snapshot: RankerSnapshot, events: list[dict[str, Any]]) -> tuple[Dataset, int]:
    """The base artifact's event snapshot plus the logged events after it (known items only),
    as a dataset for :func:`write_ranker_artifact`, and the new snapshot time."""
    items = snapshot.items
    item_row = items.row_of()
    user_ids = snapshot.user_ids.tolist()
    user_row = {user_id: row for row, user_id in enumerate(user_ids)}
    new_events = [
        record
        for record in events
        if str(record["item_id"]) in item_row and int(record["timestamp"]) >= snapshot.snapshot_at
    ]
    for record in new_events:
        user_id = str(record["user_id"])
        if user_id not in user_row:
            user_row[user_id] = len(user_ids)
            user_ids.append(user_id)
    base = snapshot.events
    logged_times = np.asarray([int(r["timestamp"]) for r in new_events], dtype=np.int64)
    user_index = np.concatenate(
        [base.user_index, np.asarray([user_row[str(r["user_id"])] for r in new_events], dtype=np.int32)]
    )
    item_index = np.concatenate(
        [base.item_index, np.asarray([item_row[str(r["item_id"])] for r in new_events], dtype=np.int32)]
    )
    codes = np.concatenate([base.event_code, np.asarray([int(r["event_code"]) for r in new_events], np.int8)])
    timestamps = np.concatenate([base.timestamp, logged_times])
    order = np.argsort(timestamps, kind="stable")
    combined = Events(
        user_index=user_index[order],
        item_index=item_index[order],
        event_code=codes[order],
        timestamp=timestamps[order],
        device=np.zeros(len(order), dtype="<U1"),
        # Prefixed: a logged id must not match a snapshot session's code.
        session_id=np.concatenate(
            [base.session_id, np.asarray([f"logged:{r.get('session_id', '')}" for r in new_events], dtype=np.str_)]
        )[order],
    )
    n_items = len(items)
    catalog = Catalog(
        item_ids=items.item_ids,
        titles=items.titles,
        descriptions=np.full(n_items, "", dtype="<U1"),
        brands=items.brands,
        categories=items.categories,
        prices=items.prices,
        stock=items.stock,
        created_at=items.created_at,
    )
    users = Users(user_ids=np.asarray(user_ids, dtype=np.str_), created_at=np.zeros(len(user_ids), np.int64))
    name = f"{snapshot.params.get('dataset', 'unknown')}+logs"
    snapshot_at = max(snapshot.snapshot_at, int(logged_times.max()) + 1 if len(logged_times) else 0)
    return Dataset(name=name, catalog=catalog, users=users, events=combined), snapshot_at


def train_ranker_from_logs(
    logs: Path, root: Path, settings: RankerBuildSettings, base_version: str | None = None
) -> Artifact:
    """Train on captured impressions labelled by the events that followed them; write a
    ranker artifact on the base artifact's items and event snapshot (plus the logged events)."""
    started = time.perf_counter()
    try:
        impressions = read_records(logs, IMPRESSIONS)
        events = read_records(logs, EVENTS)
    except ValueError as error:
        raise CaptureError(str(error)) from error
    if not impressions:
        raise CaptureError(f"{logs}: no impression records (ranking.capture.enabled writes them)")
    requests = logged_requests(impressions, events, settings.log_label_window_s)
    holdout_of = {
        request.request_id: (zlib.crc32(request.user_id.encode()) % 1000) < settings.holdout_users * 1000
        for request in requests
    }
    train = _ranking_data([r for r in requests if not holdout_of[r.request_id]])
    holdout = _ranking_data([r for r in requests if holdout_of[r.request_id]])
    if len(train.labels) < 20:
        raise CaptureError(
            f"{logs}: only {len(train.labels)} training impressions have an item with a later event "
            f"(within {settings.log_label_window_s} s); log more traffic and events"
        )
    event(
        log,
        "training from logs",
        impressions=len(impressions),
        events=len(events),
        train_requests=train.requests,
        labelled=train.with_relevant_candidate,
    )
    snapshot = load_ranker_snapshot(root, version=base_version)
    # The new ranker keeps the base's build settings (they are recorded with it), so also its prior.
    model, lgb_params = fit_ranker(train, settings, score_prior(recorded_build_settings(snapshot.params, root)))
    model, cold_start = gate_cold_start(model, holdout, settings)
    metrics: dict[str, Any] = {
        "train_requests": train.requests,
        "train_requests_with_relevant_candidate": train.with_relevant_candidate,
        **compare_on_holdout(model, holdout),
        **cold_start,
        "train_seconds": 0.0,
    }
    dataset, snapshot_at = snapshot_with_logged_events(snapshot, events)
    metrics["train_seconds"] = round(time.perf_counter() - started, 2)
    params = {
        "dataset": dataset.name,
        "source": "logs",
        "logs": str(logs),
        "base_version": snapshot.version,
        "impressions": len(impressions),
        "logged_events": len(events),
        "label_window_s": settings.log_label_window_s,
        # Co-interaction features must stay as the base computed them (the logged values came from it).
        "ranker_build": snapshot.params.get("ranker_build"),
        "from_logs_settings": settings.model_dump(),
        "lightgbm": lgb_params,
        "feature_importance_gain": importance(model.booster),
        "ranks_cold_start": model.ranks_cold_start,
    }
    # The logged features came from the base's item model: the new one is refitted on the
    # grown snapshot with the base's settings, not tuned again.
    item_model = served_item_model_settings(snapshot.params, root)
    popularity = served_popularity(snapshot.params)
    return write_ranker_artifact(
        root, model.booster, snapshot.items, dataset, snapshot_at, params, metrics, item_model, popularity
    )
