"""The recommendation request path: retrieve -> features -> score -> rules -> explain.

Each stage is a component with typed input and output; training reuses the first
two (:class:`CandidateStage` and :class:`FeatureBuilder`) so the ranker learns on
exactly what serving computes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ranking_service.artifact import LoadedRanker
from ranking_service.candidates import CandidateRequest, CandidateStage
from ranking_service.explain import reasons
from ranking_service.features import CandidateSet, FeatureBuilder, FeatureMatrix, RequestContext
from ranking_service.retrieval_client import CandidateSource
from ranking_service.rules import RuleInput, apply_rules
from ranking_service.scoring import Scorer
from ranking_service.store import UserHistory
from shared.config import RankingSettings
from shared.data import DEVICES
from shared.errors import InvalidArgument
from shared.proto.vitrine.v1 import catalog_pb2
from shared.telemetry import CANDIDATES, DEGRADED, PARTIAL, STAGE_LATENCY

# The label under which this service's metrics are recorded.
RANKING_SERVICE = "vitrine.v1.Ranking"

MAX_SESSION_ITEMS = 50
MAX_ID_CHARS = 256
# 3000-01-01: anything later is a unit mistake (milliseconds sent as seconds).
MAX_TIMESTAMP = 32_503_680_000


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    timestamp: int  # 0: now
    device: str
    session_item_ids: Sequence[str]
    exclude_item_ids: Sequence[str]
    # Declared tastes (used when the user has no history and no session) and a filter.
    preferences: catalog_pb2.DeclaredPreferences | None = None
    item_filter: catalog_pb2.ItemFilter | None = None


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str
    title: str
    brand: str
    category: str
    price: float


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    model_version: str
    index_version: str
    cold_start: bool
    degraded_reason: str
    partial_reason: str
    removed_by_rules: dict[str, int]
    stage_ms: dict[str, float]


class RankingPipeline:
    def __init__(self, ranker: LoadedRanker, retrieval: CandidateSource, settings: RankingSettings) -> None:
        self.ranker = ranker
        self._settings = settings
        self._candidates = CandidateStage(ranker.items, ranker.item_row, ranker.stats.popular_rows, retrieval, settings)
        self._features = FeatureBuilder(ranker.items, ranker.stats)
        self.scorer = Scorer(ranker.booster, ranker.model_path, settings.predict_threads, settings.compiled_trees)

    # -- validation ---------------------------------------------------------------
    def validate(self, query: RecommendQuery) -> None:
        if not query.user_id:
            raise InvalidArgument(
                "user_id is empty; pass the caller's user id (any id; unknown ids get popular items)", field="user_id"
            )
        if len(query.user_id) > MAX_ID_CHARS:
            raise InvalidArgument(
                f"user_id has {len(query.user_id)} characters; at most {MAX_ID_CHARS}", field="user_id"
            )
        if not 1 <= query.k <= self._settings.max_k:
            raise InvalidArgument(f"k must be between 1 and {self._settings.max_k}, got {query.k}", field="k")
        if len(query.exclude_item_ids) > self._settings.max_exclusions:
            raise InvalidArgument(
                f"exclude_item_ids has {len(query.exclude_item_ids)} ids; at most {self._settings.max_exclusions}",
                field="exclude_item_ids",
            )
        if len(query.session_item_ids) > MAX_SESSION_ITEMS:
            raise InvalidArgument(
                f"context.session_item_ids has {len(query.session_item_ids)} ids; send the last {MAX_SESSION_ITEMS}",
                field="context.session_item_ids",
            )
        if query.preferences is not None and not (query.preferences.brands or query.preferences.categories):
            raise InvalidArgument(
                "preferences name no brand and no category; declare at least one", field="preferences"
            )
        if not 0 <= query.timestamp <= MAX_TIMESTAMP:
            raise InvalidArgument(
                f"context.timestamp must be unix seconds in 0..{MAX_TIMESTAMP} (0 = now), got {query.timestamp}",
                field="context.timestamp",
            )

    def _rows(self, item_ids: Sequence[str]) -> npt.NDArray[np.int32]:
        row_of = self.ranker.item_row
        return np.asarray([row_of[i] for i in item_ids if i in row_of], dtype=np.int32)

    # -- stage 2: features ------------------------------------------------------------
    def features(self, history: UserHistory, context: RequestContext, candidates: CandidateSet) -> FeatureMatrix:
        return self._features.build(history, context, candidates)

    # -- stage 3: score -------------------------------------------------------------------
    def score(self, features: FeatureMatrix) -> npt.NDArray[np.float32]:
        return self.scorer.predict(features.values)

    # -- the whole request -----------------------------------------------------------------
    def recommend(self, query: RecommendQuery, timeout_s: float) -> Recommendation:
        self.validate(query)
        started = time.perf_counter()
        stage_ms: dict[str, float] = {}

        def lap(stage: str) -> None:
            nonlocal started
            now = time.perf_counter()
            stage_ms[stage] = round((now - started) * 1000.0, 3)
            STAGE_LATENCY.labels(RANKING_SERVICE, stage).observe(now - started)
            started = now

        timestamp = query.timestamp or int(time.time())
        context = RequestContext(
            timestamp=timestamp,
            device=query.device if query.device in DEVICES else "",
            session_rows=self._rows(query.session_item_ids),
        )
        history = self.ranker.histories.history(query.user_id, before=timestamp + 1, limit=None)
        excluded = self._rows(query.exclude_item_ids)
        cold_start = not len(history) and not len(context.session_rows)

        retrieved = self._candidates.retrieve(
            query.user_id, history, context, excluded, timeout_s, CandidateRequest(query.preferences, query.item_filter)
        )
        lap("retrieve")
        CANDIDATES.labels(RANKING_SERVICE).observe(len(retrieved.candidates.rows))
        if retrieved.degraded_reason:
            DEGRADED.labels(RANKING_SERVICE, retrieved.degraded_reason).inc()
        if retrieved.partial_reason:
            PARTIAL.labels(RANKING_SERVICE, retrieved.partial_reason).inc()
        features = self.features(history, context, retrieved.candidates)
        lap("features")
        scores = self.score(features)
        lap("predict")
        rows = retrieved.candidates.rows
        outcome = apply_rules(
            RuleInput(rows, scores, history.purchased_rows(), excluded, self.ranker.items.stock), query.k
        )
        explained = reasons(features, outcome.selected, rows, self.ranker.items)
        lap("rules")
        items = self.ranker.items
        recommended = [
            RecommendedItem(
                item_id=str(items.item_ids[rows[position]]),
                score=float(scores[position]),
                reason=reason,
                title=str(items.titles[rows[position]]),
                brand=str(items.brands[rows[position]]),
                category=str(items.categories[rows[position]]),
                price=float(items.prices[rows[position]]),
            )
            for position, reason in zip(outcome.selected.tolist(), explained, strict=True)
        ]
        return Recommendation(
            items=recommended,
            model_version=self.ranker.version,
            index_version=retrieved.index_version,
            cold_start=cold_start,
            degraded_reason=retrieved.degraded_reason,
            partial_reason=retrieved.partial_reason,
            removed_by_rules=outcome.removed,
            stage_ms=stage_ms,
        )
